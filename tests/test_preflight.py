"""Preflight's verdict on nodes' reports (the checks themselves run on the test cluster:
tests/cluster/test_preflight.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert checks == {("n2", "storage"), ("n3", "storage"), ("n4", "space")}
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


GPU_SHIMS = Path(__file__).resolve().parent / "cluster" / "gpu_shims"


def _smi(tmp_path, monkeypatch, mine: dict) -> dict:
    """This node's report with the test-only nvidia-smi answering from `mine`."""
    import json
    import os

    from glmsnake.launch import preflight

    cfg = tmp_path / "gpus.json"
    cfg.write_text(json.dumps({"default": mine}))
    monkeypatch.setenv("PATH", f"{GPU_SHIMS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GLMSNAKE_FAKE_GPUS", str(cfg))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    monkeypatch.setattr(preflight, "SMI_TIMEOUT_S", 2.0)
    return preflight.node_report(PreflightSpec(gpus_per_node=8, nodes=1), tmp_path, "t0k")


def test_what_nvidia_smi_says_and_when_it_fails(tmp_path, monkeypatch):
    rep = _smi(tmp_path, monkeypatch, {"warning": True, "ecc": {"2": "[GPU requires reset]", "5": "[N/A]"},
                                       "busy": {"7": [99]}, "nvlink": True})
    assert rep["smi_gpus"] == 8 and rep["driver"] == "550.54.15" and rep["cuda"] == "12.4"  # the warning skipped
    assert rep["ecc_gpus"] == ["2 ([GPU requires reset])"] and rep["busy_gpus"] == {"7": ["99"]}
    assert rep["nvlink_refs"] == 56 and rep["token"] == "t0k" and "smi_error" not in rep
    # A GPU node whose nvidia-smi fails, or hangs, fails preflight; it does not pass as a CPU node.
    for fault, said in (({"fail": "No devices were found"}, "exited with 6: No devices were found"),
                        ({"hang": 30}, "did not answer within 2 s")):
        rep = _smi(tmp_path, monkeypatch, fault)
        assert said in rep["smi_error"] and rep["seconds"] < 10
        v = judge(PreflightSpec(gpus_per_node=8, nodes=1), {"n1": rep}, tmp_path, "t0k")
        assert v["bad_nodes"] == ["n1"] and "nvidia-smi fails on n1: " in str(explain(v))


def test_a_tie_at_the_top_names_every_side_and_a_shared_problem_excludes_nobody():
    three = _judge({"a": GOOD, "b": GOOD, "c": {**GOOD, "driver": "535"}, "d": {**GOOD, "driver": "535"},
                    "e": {**GOOD, "driver": "520"}})
    assert three["bad_nodes"] == ["a", "b", "c", "d", "e"]  # 2/2/1: no majority
    # Full shared disk: every node fails, none is worth leaving out; a lone bad node is.
    full = _judge({"n1": {**GOOD, "free_bytes": 1}, "n2": {**GOOD, "free_bytes": 1}}, room_bytes=10)
    assert full["bad_nodes"] == ["n1", "n2"] and full["excludable"] == []
    busy = _judge({"n1": GOOD, "n2": GOOD, "n3": {**GOOD, "busy_gpus": {"0": ["1"]}}})
    assert busy["excludable"] == ["n3"]
    everywhere = _judge({"n1": {**GOOD, "busy_gpus": {"0": ["1"]}}, "n2": {**GOOD, "busy_gpus": {"0": ["1"]}}})
    assert everywhere["excludable"] == []  # leaving out the whole allocation helps nothing


def test_every_rank_gets_the_verdict_and_a_silent_node_is_named(tmp_path, monkeypatch):
    """preflight.run as three nodes' tasks call it (threads here); n2 never reports."""
    import threading

    import pytest

    from glmsnake.launch import preflight

    monkeypatch.setenv("GLMSNAKE_NODE_ADDRS", "n0=10.0.0.1,n1=10.0.0.2,n2=10.0.0.3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)  # no nvidia-smi here
    spec = PreflightSpec(gpus_per_node=0, nodes=3, deadline_s=2.0)
    out: dict = {}

    def task(rank: int) -> None:
        try:
            out[rank] = preflight.run(spec, tmp_path, rank, 0, f"n{rank}", 3)
        except preflight.PreflightFailed as e:
            out[rank] = e

    threads = [threading.Thread(target=task, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(out[0], preflight.PreflightFailed) and isinstance(out[1], preflight.PreflightFailed)
    assert out[0].bad_nodes == ["n2"] and "n2 sent no preflight report within 2 s" in str(out[0])
    verdict = __import__("json").loads((tmp_path / preflight.VERDICT).read_text())
    assert sorted(verdict["seconds"]) == ["n0", "n1"] and verdict["excludable"] == ["n2"]
    with pytest.raises(preflight.PreflightFailed):  # a late task reads the same verdict
        preflight.run(spec, tmp_path, 2, 0, "n2", 3)


def _run_nodes(tmp_path, monkeypatch, spec, ranks, nodes=3):
    """preflight.run as `nodes` nodes' first tasks call it (threads here); only `ranks` take part."""
    import threading

    from glmsnake.launch import preflight

    monkeypatch.setenv("GLMSNAKE_NODE_ADDRS", ",".join(f"n{r}=127.0.0.1" for r in range(nodes)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)  # no nvidia-smi here
    out: dict = {}

    def task(rank: int) -> None:
        try:
            out[rank] = preflight.run(spec, tmp_path, rank, 0, f"n{rank}", nodes, node_rank=rank, address="127.0.0.1")
        except preflight.PreflightFailed as e:
            out[rank] = e

    threads = [threading.Thread(target=task, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_an_all_reduce_across_the_nodes_sums_every_rank(tmp_path, monkeypatch):
    """One all-reduce over a full TCP mesh between the nodes' addresses."""
    import json

    out = _run_nodes(tmp_path, monkeypatch, PreflightSpec(gpus_per_node=0, nodes=3, deadline_s=20.0), range(3))
    assert all(v["ok"] for v in out.values()), out
    for n in range(3):
        net = json.loads((tmp_path / "preflight" / f"n{n}.json").read_text())["allreduce"]
        assert net["ok"] and net["sum"] == net["want"] == 6.0 and net["seconds"] < 10


def test_a_node_missing_from_the_all_reduce_is_named_within_the_deadline(tmp_path, monkeypatch):
    import time

    from glmsnake.launch import preflight

    t0 = time.monotonic()
    out = _run_nodes(tmp_path, monkeypatch, PreflightSpec(gpus_per_node=0, nodes=3, deadline_s=3.0), (0, 1))
    assert time.monotonic() - t0 < 15
    assert isinstance(out[0], preflight.PreflightFailed) and out[0].bad_nodes == ["n2"]  # n1 waited, and is fine
    assert "network: n2 did not take part in the all-reduce across the nodes before the deadline (2 node(s)" in str(out[0])


def test_a_missing_network_interface_is_a_finding_with_the_fix(tmp_path, monkeypatch):
    from glmsnake.launch import preflight

    spec = PreflightSpec(gpus_per_node=0, nodes=1, interface="nosuch0")
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    rep = preflight.node_report(spec, tmp_path, None)
    assert "no network interface 'nosuch0' on " in rep["interface_error"] and "(it has: " in rep["interface_error"]
    verdict = preflight.judge(spec, {"n0": rep, "n1": {**rep, "interface_error": None}}, tmp_path)
    assert verdict["bad_nodes"] == ["n0"] and verdict["failures"][0]["check"] == "network"
    assert "set `slurm.network_interface` to an interface every node has" in verdict["failures"][0]["fix"]
    assert verdict["excludable"] == ["n0"]


def test_an_interface_is_judged_by_the_kernel_list_missing_or_its_link_down(tmp_path):
    """sysfs, as the kernel lists this node's interfaces: a missing one names what the node has,
    a link that is down is a problem even though the interface keeps its address."""
    from glmsnake.launch.addresses import interface_problem

    net = tmp_path / "net"
    for name, state in (("lo", "unknown"), ("eth0", "up"), ("ib0", "down"), ("ib1", "lowerlayerdown")):
        (net / name).mkdir(parents=True)
        (net / name / "operstate").write_text(state + "\n")
    assert interface_problem("lo", net) is None and interface_problem("eth0", net) is None
    assert "network interface 'ib0' on " in interface_problem("ib0", net) and "is down" in interface_problem("ib0", net)
    assert "is lowerlayerdown" in interface_problem("ib1", net)
    assert "no network interface 'ib7' on " in interface_problem("ib7", net)
    assert "(it has: eth0, ib0, ib1, lo)" in interface_problem("ib7", net)
    assert "(it has: none)" in interface_problem("ib0", tmp_path / "empty")


def _nccl_reports(results: dict) -> dict:
    return {n: {"nccl_allreduce": a, "seconds": 0.1} for n, a in results.items()}


def test_nccl_findings_name_the_node_torch_cannot_use_or_every_node_when_the_collective_failed(tmp_path):
    """A node whose torch cannot use its GPUs is named alone (the others only waited); a collective
    that failed everywhere names every node and leaves none out; one failed on part of the nodes
    names those; where another check already named a node, only the local findings count."""
    from glmsnake.launch.preflight import _judge_nccl

    def judged(results, others_failed=False):
        failures = []
        _judge_nccl(_nccl_reports(results), lambda node, check, problem, fix: failures.append((node, check, problem)),
                    others_failed)
        return failures

    waited = {"ok": False, "error": "DistStoreError: timed out"}
    no_cuda = {"ok": False, "error": "torch 2.8.0 (CUDA 12.8) cannot use the GPUs: driver too old", "local": True}
    ok = {"ok": True, "sum": 3.0, "want": 3.0, "seconds": 2.0}
    assert judged({"a": ok, "b": ok}) == []
    assert judged({"a": waited, "b": no_cuda}) == [
        ("b", "gpus", "torch 2.8.0 (CUDA 12.8) cannot use the GPUs: driver too old on b, though nvidia-smi lists them")]
    every = judged({"a": waited, "b": waited, "c": waited})
    assert len(every) == 1 and every[0][0] == "a,b,c" and every[0][1] == "network"
    assert "failed on every node (DistStoreError: timed out)" in every[0][2]
    assert [f[0] for f in judged({"a": ok, "b": waited})] == ["b"]
    assert judged({"a": waited, "b": waited}, others_failed=True) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_the_nccl_probe_reports_a_torch_without_cuda_as_a_local_finding():
    """The child's own verdict on a machine whose torch has no CUDA (this one): local, with torch's version."""
    import json
    import subprocess
    import sys
    import time

    from glmsnake.launch import nccl_probe

    out = subprocess.run([sys.executable, nccl_probe.__file__, "127.0.0.1", "1", "0", "1", str(time.time() + 5)],
                         capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] is False and result["local"] is True
    assert "cannot use the GPUs" in result["error"] and result["error"].startswith("torch ")


def test_the_packages_each_node_sees_are_compared_and_the_odd_node_named_with_the_difference(tmp_path):
    """The inventory is what this interpreter sees (torch among it, and the OS); a node whose image
    holds another version or another package is named with it; a tie names both sides."""
    from glmsnake.launch import preflight

    mine = preflight.software_inventory()
    assert mine["torch"] == preflight._package_version("torch") and mine.get("(os)")
    spec = PreflightSpec(gpus_per_node=0, nodes=3)
    base = {"torch": "2.8.0", "ray": "2.53.0", "(os)": "Ubuntu 24.04"}
    reps = {"a": {"packages": base, "seconds": 0.1}, "b": {"packages": base, "seconds": 0.1},
            "c": {"packages": {**base, "ray": "2.54.0", "flash-attn": "2.6.3"}, "seconds": 0.1}}
    verdict = preflight.judge(spec, reps, tmp_path)
    assert verdict["bad_nodes"] == ["c"] and verdict["excludable"] == ["c"]
    f = verdict["failures"][0]
    assert f["check"] == "software" and f["problem"] == "the packages on c differ from the other nodes': ray 2.54.0 (others 2.53.0), +flash-attn 2.6.3"
    assert f["fix"] == "install one Python environment for every node (on shared storage), or leave c out"
    # In a container the OS release is the image's too, and the fix is to pin the image.
    in_image = {n: {**r, "image": "registry.example/slime:latest"} for n, r in reps.items()}
    in_image["c"] = {**in_image["c"], "packages": {**base, "(os)": "Ubuntu 22.04"}}
    f = preflight.judge(spec, in_image, tmp_path)["failures"][0]
    assert f["problem"] == "the packages on c differ from the other nodes': (os) Ubuntu 22.04 (others Ubuntu 24.04)"
    assert "pin it by digest, IMAGE@sha256:..." in f["fix"]
    without_image = {n: {**r, "image": None} for n, r in in_image.items()}
    assert preflight.judge(spec, without_image, tmp_path)["ok"]  # nodes' own OS a release apart: no mismatch
    tie = preflight.judge(PreflightSpec(gpus_per_node=0, nodes=2), {"a": reps["a"], "c": reps["c"]}, tmp_path)
    assert tie["bad_nodes"] == ["a", "c"] and len(tie["failures"]) == 2
    assert preflight.judge(spec, {n: reps["a"] for n in "abc"}, tmp_path)["ok"]


def test_the_nccl_library_torch_loads_must_be_alike_on_every_node(tmp_path):
    """The NCCL probe reports the NCCL torch loaded (an image's own, not a pip package): compared."""
    from glmsnake.launch import preflight

    ok = {"ok": True, "sum": 6.0, "want": 6.0, "seconds": 1.0}
    reps = {n: {"nccl_allreduce": ok, "nccl_runtime": v, "seconds": 0.1}
            for n, v in (("a", "2.27.3"), ("b", "2.27.3"), ("c", "2.21.5"))}
    verdict = preflight.judge(PreflightSpec(gpus_per_node=8, nodes=3), reps, tmp_path)
    assert verdict["bad_nodes"] == ["c"]
    assert verdict["failures"][0]["problem"] == ("NCCL (as torch loads it) 2.21.5 on c differs from the other nodes' "
                                                 "(2.27.3 on 2 node(s))")


def test_nccl_judged_after_the_other_checks_a_wrong_sum_and_a_node_that_took_no_part(tmp_path):
    """A wrong sum is a finding with its numbers; a node already named for its software is the one
    left out (not every node for the collective it stalled); a node that took no part while the
    others did is named alone."""
    from glmsnake.launch import preflight

    spec = PreflightSpec(gpus_per_node=8, nodes=3)
    ok = {"ok": True, "sum": 6.0, "want": 6.0, "seconds": 1.0, "nccl": "2.27.3"}
    wrong = {"ok": False, "sum": 5.0, "want": 6.0, "error": "the all-reduce summed to 5.0, 6.0 expected"}
    waited = {"ok": False, "error": "no result before the deadline"}
    verdict = preflight.judge(spec, {"a": {"nccl_allreduce": ok, "seconds": 0.1},
                                     "b": {"nccl_allreduce": wrong, "seconds": 0.1},
                                     "c": {"nccl_allreduce": ok, "seconds": 0.1}}, tmp_path)
    assert verdict["bad_nodes"] == ["b"] and "summed to 5.0, 6.0 expected" in verdict["failures"][0]["problem"]
    verdict = preflight.judge(spec, {"a": {"nccl_allreduce": waited, "torch": "2.8.0", "seconds": 0.1},
                                     "b": {"nccl_allreduce": waited, "torch": "2.8.0", "seconds": 0.1},
                                     "c": {"nccl_allreduce": waited, "torch": "2.7.1", "seconds": 0.1}}, tmp_path)
    assert verdict["bad_nodes"] == ["c"] and verdict["excludable"] == ["c"]
    assert [f["check"] for f in verdict["failures"]] == ["software"]
    verdict = preflight.judge(spec, {"a": {"nccl_allreduce": waited, "seconds": 0.1},
                                     "b": {"seconds": 0.1}, "c": {"nccl_allreduce": waited, "seconds": 0.1}}, tmp_path)
    assert verdict["bad_nodes"] == ["b"] and verdict["excludable"] == ["b"]
    assert "b took no part in the NCCL all-reduce across the nodes: nvidia-smi lists no GPUs there" in verdict["failures"][0]["problem"]


def test_a_node_that_cannot_take_part_in_the_nccl_all_reduce_stops_the_others_waiting(tmp_path):
    """Node rank 0's TCP all-reduce failed, so it leaves a mark and publishes no store: node rank 1
    stops waiting at once instead of at the deadline."""
    import time

    from glmsnake.launch.preflight import nccl_allreduce

    t0 = time.monotonic()
    first = nccl_allreduce(tmp_path, 0, 2, "127.0.0.1", time.monotonic() + 60, take_part=False)
    second = nccl_allreduce(tmp_path, 1, 2, "127.0.0.1", time.monotonic() + 60)
    assert first["error"] == "skipped: the TCP all-reduce across the nodes failed here"
    assert second == {**second, "ok": False, "error": "stopped waiting: node rank(s) 0 could not take part", "waited_for": [0]}
    assert time.monotonic() - t0 < 5
