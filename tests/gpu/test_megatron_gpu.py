"""Megatron itself loads glmsnake's torch_dist checkpoints (needs a CUDA GPU and megatron-core).

Skipped where either is missing (CI); on a GPU machine it makes the inputs of both embedded
models (tiny: glm4_moe; tiny-mla: glm4_moe_lite) with the real writer (1, 2 and 4 writer ranks)
and runs tests/gpu/megatron_check.py, which must report
no missing/unexpected keys, matching logits (main and MTP) and the committed key manifest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

HERE = Path(__file__).parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("preset, fixture, extra", [
    ("tiny", "megatron_keys_tiny.json", []),
    # transformers builds glm4_moe_lite's q_a/kv_a norms with eps 1e-6, megatron-core with the model's
    # 1e-5: the reference takes Megatron's value so that the comparison tests the weights alone.
    ("tiny-mla", "megatron_keys_tiny_mla.json", ["--latent-norm-eps", "megatron", "--rel-tol-fp32", "1e-5"]),
])
def test_megatron_loads_glmsnake_checkpoints(tmp_path, preset, fixture, extra):
    sys.path.insert(0, str(HERE))
    from make_inputs import make_inputs

    made = make_inputs(tmp_path / "inputs", preset=preset)
    ckpts = [a for w in (1, 2, 4) for a in ("--ckpt", f"w{w}={made[f'w{w}']}")]
    cmd = [sys.executable, str(HERE / "megatron_check.py"), "--hf", str(made["hf"]), *ckpts, *extra,
           "--manifest-name", fixture, "--fixture", str(HERE.parent / "fixtures" / fixture), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert report["ok"], proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["manifest_matches_fixture"]
    assert len(report["runs"]) == 6 and all(not r["missing"] and not r["unexpected"] for r in report["runs"])
