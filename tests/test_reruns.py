"""Reruns mean what they say, on real runs of the tiny preset (one workflow, changed step by step).

The tests run in order on one base folder: a finished run, then an extension, a changed
setting, `train.on_change: continue`, and an architecture change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import REPO, snakemake
from test_workflow import jobs_of

SHORT = "rollout: {num_rollout: 4}"
LONGER = "rollout: {num_rollout: 8}"


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    wd = tmp_path_factory.mktemp("reruns")
    base = wd / "results"

    def run(runs: str, *extra: str, check: bool = True):  # extra: more --config values, then other flags
        return snakemake(wd, "--profile", str(REPO / "profiles/local"), "all", "--config", f"base_dir={base}",
                         f"runs={{default: {{{runs}}}}}", *extra, check=check)

    run(SHORT)
    return base, run


def sentinel(base: Path) -> dict:
    return json.loads((base / "runs/default/glmsnake.done.json").read_text())


def exported(base: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((base / "runs/default/hf").glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def previous(base: Path) -> list[Path]:
    folder = base / "runs/default/previous"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_longer_run_continues_from_the_last_checkpoint(wf):
    base, run = wf
    first = exported(base)
    out = run(LONGER).stdout
    assert "localrule train_run" in out
    s = sentinel(base)
    assert s["final_iteration"] == 7 and s["lineage"]["resumed_from"] == 3 and s["lineage"]["set_aside"] is None
    assert "the run's length changed (rollout.num_rollout)" in s["lineage"]["decision"]
    assert previous(base) == []
    assert exported(base) != first


def test_a_changed_setting_retrains_and_keeps_the_earlier_checkpoints(wf):
    base, run = wf
    before_hash, before_export = sentinel(base)["lineage"]["settings_hash"], exported(base)
    (base / "runs/default/hf/MY_NOTES.md").write_text("my model card")
    run(LONGER + ", optimizer: {lr: 0.02}")
    assert (base / "runs/default/hf/MY_NOTES.md").read_text() == "my model card"  # the export was redone
    s = sentinel(base)
    assert s["final_iteration"] == 7 and s["lineage"]["resumed_from"] is None
    assert s["lineage"]["decision"] == "settings changed (optimizer.lr)"
    [aside] = previous(base)
    assert aside.name == before_hash and s["lineage"]["set_aside"] == str(aside)
    assert sorted(p.name for p in (aside / "checkpoints").glob("iter_*")) == [
        "iter_0000003", "iter_0000007"]
    assert len((aside / "metrics.jsonl").read_text().splitlines()) >= 8  # the curves of those checkpoints
    assert exported(base) != before_export
    log = (base / "logs/train.default.log").read_text()
    assert f"the earlier checkpoints moved to {aside}" in log


def test_on_change_continue_resumes_with_the_new_settings(wf):
    base, run = wf
    run("rollout: {num_rollout: 12}, optimizer: {lr: 0.03}, train: {on_change: continue}")
    s = sentinel(base)
    assert s["final_iteration"] == 11 and s["lineage"]["resumed_from"] == 7 and s["lineage"]["set_aside"] is None
    assert "train.on_change: continue" in s["lineage"]["decision"] and len(previous(base)) == 1


def test_an_architecture_change_always_retrains_and_the_export_loads(wf):
    base, run = wf
    arch = "overrides={model: {num_layers: 4, moe_layer_freq: '[0]*1+[1]*3'}}"
    for folder in ("tiny-glm4moe-FP8", "runs/default/hf"):
        (base / folder / "MY_NOTES.md").write_text(f"notes on {folder}")
    out = run(SHORT + ", optimizer: {lr: 0.03}, train: {on_change: continue}", arch).stdout
    assert "convert_fp8" in jobs_of_run(out)
    for folder in ("tiny-glm4moe-FP8", "runs/default/hf"):  # both were replaced; the notes stayed
        assert (base / folder / "MY_NOTES.md").read_text() == f"notes on {folder}"
    assert {"download_hf", "convert_torch_dist", "train_run", "export_hf"} <= set(jobs_of_run(out))
    s = sentinel(base)
    assert s["lineage"]["resumed_from"] is None and "architecture changed" in s["lineage"]["decision"]
    assert len(previous(base)) == 2
    index = json.loads((base / "runs/default/hf/model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("model.layers.3.") for k in index)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base / "runs/default/hf")
    assert model.config.num_hidden_layers == 4


def jobs_of_run(out: str) -> dict[str, int]:
    """The job stats of a real run (Snakemake prints the same table as for a dry run)."""
    return jobs_of(out.replace("Nothing to be done", ""))


def _processes_running(needle: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_a_killed_attempts_log_is_kept_and_the_rerun_resumes(wf):
    """SIGKILL the whole workflow mid-training: the rerun resumes, and both attempts' logs remain."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base, run = wf
    arch = "overrides={model: {num_layers: 4, moe_layer_freq: '[0]*1+[1]*3'}}"
    longer = "rollout: {num_rollout: 24}, optimizer: {lr: 0.03}, train: {on_change: continue}"
    wd = base.parent
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(wd), "--configfile",
           str(REPO / "config/config.yaml"), "--cores", "2", "--profile", str(REPO / "profiles/local"), "train",
           "--config", f"base_dir={base}", f"runs={{default: {{{longer}}}}}", arch]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    ck = base / "runs/default/checkpoints"
    deadline = time.time() + 300
    while not (ck / "iter_0000007").is_dir():
        assert proc.poll() is None and time.time() < deadline, "no new checkpoint in time"
        time.sleep(0.2)
    settings = str(base / "runs/default/trainer_settings.json")
    drivers = _processes_running(f"glmsnake.trainer.driver --settings {settings}")
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and the step
    for pid in drivers:  # the driver runs in a session of its own (so Ctrl-C reaches all of it)
        os.killpg(pid, signal.SIGKILL)
    proc.wait()
    snakemake(wd, "--unlock", "--config", f"base_dir={base}")
    run(longer, arch)
    s = sentinel(base)
    assert s["final_iteration"] == 23 and s["lineage"]["resumed_from"] >= 7
    logs = base / "runs/default/logs"
    attempts = sorted(logs.glob("attempt-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    killed, last = attempts[-2], attempts[-1]
    assert "resuming from iter 3" in killed.read_text()  # the killed attempt's own lines
    assert f"resuming from iter {s['lineage']['resumed_from']}" in last.read_text()
    rule_log = base / "logs/train.default.log"
    assert rule_log.read_text() == last.read_text()  # the rule's log is the last attempt, under both names
    assert f"this log is also {last}; earlier attempts: {logs}/" in rule_log.read_text()


def test_damaged_outputs_are_named_by_verify_and_refused_by_the_steps_that_read_them(wf, tmp_path):
    import subprocess
    import sys

    base, run = wf
    damaged = [base / "tiny-glm4moe/model-00001-of-00003.safetensors",
               base / "tiny-glm4moe_torch_dist/release/__0_0.distcp",
               base / "tiny-glm4moe-FP8/model-00002-of-00003.safetensors",
               base / "runs/default/hf/model-00001-of-00003.safetensors"]
    for f in damaged:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 10)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"base_dir: {base}\n")
    out = subprocess.run([sys.executable, "-m", "glmsnake.cli", "verify", "--configfile", str(cfg)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    for f in damaged:
        assert f"    {f}: {f.stat().st_size} bytes, {f.stat().st_size + 10} when it was made" in out.stdout
    assert "fix: snakemake --profile <profile> --forcerun convert_fp8 all" in out.stdout
    assert "train      " in out.stdout and "files as made" in out.stdout  # the checkpoint is intact
    # A step that reads a damaged input refuses it before it starts, naming the file and the fix.
    arch = "overrides={model: {num_layers: 4, moe_layer_freq: '[0]*1+[1]*3'}}"
    step = run("rollout: {num_rollout: 24}, optimizer: {lr: 0.03}, train: {on_change: continue}", arch,
               "--forcerun", "convert_fp8", check=False)
    assert step.returncode != 0
    assert f"the HF weights in {base / 'tiny-glm4moe'} changed since it was made" in step.stdout
    assert f"{damaged[0]}: {damaged[0].stat().st_size} bytes" in step.stdout
    assert "fix: regenerate it: snakemake --forcerun download_hf" in step.stdout


def test_the_decision_table():
    """steps/lineage.decide, case by case (the real runs above cover the moves)."""
    from glmsnake.steps.lineage import decide

    key = {"architecture": {"num_layers": 3}, "rollout": {"num_rollout": 8}, "optimizer": {"lr": 0.01}}

    def with_(**groups):
        return {**key, **{g: {**key[g], **v} for g, v in groups.items()}}

    assert decide(key, key, "restart", 7).action == "resume"
    assert decide(key, with_(rollout={"num_rollout": 16}), "restart", 7).action == "resume"
    assert decide(key, with_(rollout={"num_rollout": 6}), "restart", 3).action == "resume"  # shorter, before the end
    assert decide(key, with_(rollout={"num_rollout": 4}), "restart", 7).action == "set_aside"  # a checkpoint beyond it
    assert decide(key, with_(optimizer={"lr": 0.02}), "restart", 7).action == "set_aside"
    assert decide(key, with_(optimizer={"lr": 0.02}), "continue", 7).action == "resume"
    assert decide(key, with_(architecture={"num_layers": 4}), "continue", 7).action == "set_aside"
    assert decide(None, key, "restart", 7).action == "resume"  # checkpoints from before the record: adopted
