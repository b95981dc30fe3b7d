"""preflight's NCCL all-reduce on a real GPU (skipped without CUDA): one node, one GPU, through the
same child process and store file a multi-node job uses. Across nodes it needs a GPU cluster."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_nccl_all_reduce_runs_on_a_gpu(tmp_path):
    from glmsnake.launch.preflight import nccl_allreduce

    result = nccl_allreduce(tmp_path, 0, 1, "127.0.0.1", time.monotonic() + 120)
    assert result["ok"], result
    assert result["sum"] == result["want"] == 1.0 and result["nccl"].count(".") == 2
