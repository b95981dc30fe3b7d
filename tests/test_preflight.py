"""Preflight's verdict on nodes' reports (the checks themselves run on the test cluster:
tests/cluster/test_preflight.py)."""

from __future__ import annotations

from pathlib import Path

from glmsnake.launch.preflight import PreflightSpec, explain, judge, visible_gpus

GOOD = {"visible_gpus": 8, "smi_gpus": 8, "driver": "550.54.15", "cuda": "12.4", "nccl": "2.21.5", "torch": "2.6.0",
        "image": "slimerl/slime:v1", "python": "3.12.3", "ray": "2.60.0", "token": "t0k", "free_bytes": 10**13,
        "busy_gpus": {}, "ecc_gpus": [], "nvlink_refs": 56, "seconds": 0.4}


def _judge(reports, **spec):
    return judge(PreflightSpec(gpus_per_node=8, nodes=len(reports), **spec), reports, Path("/shared/job"), "t0k")


def test_good_nodes_pass_and_nvls_needs_nvlink_everywhere():
    v = _judge({"n1": GOOD, "n2": GOOD})
    assert v["ok"] and v["bad_nodes"] == [] and v["nvls"] == 1
    assert _judge({"n1": GOOD, "n2": {**GOOD, "nvlink_refs": 0}})["nvls"] == 0
    assert _judge({"n1": {k: v for k, v in GOOD.items() if k != "nvlink_refs"}})["nvls"] == 0  # no nvidia-smi


def test_storage_problems_name_the_node():
    v = _judge({"n1": GOOD, "n2": {**GOOD, "token": "other"}, "n3": None, "n4": {**GOOD, "free_bytes": 10**9}},
               room_bytes=5 * 10**12)
    assert v["bad_nodes"] == ["n2", "n3", "n4"]
    checks = {(f["node"], f["check"]) for f in v["failures"]}
    assert checks == {("n2", "storage"), ("n3", "storage"), ("n4", "storage")}
    text = str(explain(v))
    assert "n2 reads another file at /shared/job/preflight/token than the head wrote" in text
    assert "n3 sent no preflight report" in text and "n4 sees 1.0 GB free under /shared/job" in text
    assert "5000.0 GB" in text and "fix: " in text


def test_the_odd_one_out_is_named_and_a_tie_names_both():
    v = _judge({"n1": GOOD, "n2": GOOD, "n3": {**GOOD, "image": "slimerl/slime:v2"}})
    assert v["bad_nodes"] == ["n3"] and "container image slimerl/slime:v2 on n3" in str(explain(v))
    tie = _judge({"n1": GOOD, "n2": {**GOOD, "nccl": "2.18.1"}})
    assert tie["bad_nodes"] == ["n1", "n2"]


def test_gpus_slurm_gave_the_task(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert visible_gpus() == 3
    v = _judge({"n1": {**GOOD, "visible_gpus": 3}})
    assert "n1 gives the task 3 GPU(s) (CUDA_VISIBLE_DEVICES), the step asked for 8" in str(explain(v))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    assert visible_gpus() == 8
