"""Checkpoint retention: the rule, pruning while a real run trains, a kill mid-prune, and the disk guard."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, skip_or_fail, snakemake
from glmsnake import retention
from glmsnake.retention import Policy, plan
from glmsnake.trainer import checkpoints

SAVES = list(range(3, 40, 4))  # save_interval 4 over 40 rollouts: iterations 3, 7, ..., 39


@pytest.mark.parametrize("iterations, tracker, policy, keep", [
    (SAVES, 39, Policy(3, 20), [19, 31, 35, 39]),  # the last 3, and the milestones (i + 1) % 20 == 0
    (SAVES, 39, Policy(1), [39]),
    (SAVES, 35, Policy(1), [35, 39]),  # 39 is newer than the tracker: it may still be being written
    (SAVES, None, Policy(1), SAVES),  # no tracker: nothing is known to be complete
    ([7], 7, Policy(1), [7]),  # a run's only checkpoint
    ([3, 7, 11], 3, Policy(1), [3, 7, 11]),  # the tracker's own, and everything newer
    ([9, 19, 29, 39], 39, Policy(2, 10), [9, 19, 29, 39]),
    ([9, 19, 29, 39], 39, Policy(2, 0), [29, 39]),
], ids=["last 3 every 20", "last 1", "newer than tracker", "no tracker", "only one", "tracker oldest",
        "all milestones", "no milestones"])
def test_the_rule(iterations, tracker, policy, keep):
    kept, deleted = plan(iterations, tracker, policy)
    assert kept == keep
    assert sorted(kept + deleted) == sorted(iterations)


def fake_checkpoint(root: Path, iteration: int, files: int = 40) -> dict[str, bytes]:
    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    content = {f"__{k}_0.distcp": os.urandom(4096) for k in range(files)}
    for name, data in content.items():
        (folder / name).write_bytes(data)
    return content


@pytest.mark.parametrize("kill_after", [0, 1, 20])
def test_a_kill_during_pruning_leaves_whole_checkpoints_or_nothing(tmp_path, kill_after):
    """A pruner SIGKILLed after its rename, or after removing 1 or 20 files: every iter_* left is whole."""
    root = tmp_path / "checkpoints"
    made = {i: fake_checkpoint(root, i) for i in (3, 7, 11)}
    (root / retention.TRACKER).write_text("11")
    code = (
        "import os, shutil, signal, sys\n"
        "from pathlib import Path\n"
        "from glmsnake import retention\n"
        "real, seen = os.unlink, [0]\n"
        "def unlink(path, *a, **k):\n"
        f"    if seen[0] == {kill_after}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    seen[0] += 1\n"
        "    return real(path, *a, **k)\n"
        "os.unlink = unlink\n"
        f"retention.prune(Path({str(root)!r}), retention.Policy(1))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    for i, content in made.items():
        folder = root / f"iter_{i:07d}"
        if folder.exists():
            assert {p.name: p.read_bytes() for p in folder.iterdir()} == content, f"iter {i} is not whole"
    assert (root / "iter_0000011").is_dir() and not (root / "iter_0000003").exists()  # the first went as a whole
    leftovers = sorted(p.name for p in root.glob(f"{retention.DELETING}*"))
    assert len(leftovers) == 1 and leftovers[0].startswith(f"{retention.DELETING}iter_0000003.")
    assert retention.present(root) == [7, 11]  # a hidden leftover is no checkpoint
    retention.prune(root, Policy(1), log=lambda line: None)  # the next pass finishes the job
    assert retention.present(root) == [11] and not list(root.glob(f"{retention.DELETING}*"))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """40 rollouts of the tiny run, save_interval 4, keep the last 3 and every 20th, for real."""
    wd = tmp_path_factory.mktemp("retention")
    base = wd / "base"
    run = "{default: {rollout: {num_rollout: %d}, train: {save_interval: 4, keep_checkpoints: {last: 3, every: 20}}}}"

    def train(rollouts: int):
        return snakemake(wd, "--profile", str(REPO / "profiles/local"), "train", "--config", f"base_dir={base}",
                         f"runs={run % rollouts}", env={"GLMSNAKE_PRUNE_INTERVAL_S": "0.2"}).stdout
    train(40)
    return wd, base, train


def test_a_40_rollout_run_ends_with_exactly_the_checkpoints_the_rule_keeps(pruned_run):
    wd, base, _ = pruned_run
    root = base / "runs/default/checkpoints"
    assert checkpoints.iterations(root) == [19, 31, 35, 39]
    records = [json.loads(line) for line in (base / "runs/default/pruned_checkpoints.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [3, 7, 11, 15, 23, 27]
    assert all(r["bytes"] > 1_000_000 for r in records)  # a tiny checkpoint with optimizer state: ~3 MB
    # Pruned while training ran, not only at its end: the first deletion precedes the last save.
    assert records[0]["time"] < (root / "iter_0000039").stat().st_mtime
    log = (base / "logs/train.default.log").read_text()
    assert "[glmsnake] pruned checkpoint iter 3 (" in log and "keeping the last 3 and every 20th" in log
    sentinel = json.loads((base / "runs/default/glmsnake.done.json").read_text())
    assert [r["iteration"] for r in sentinel["pruned"]] == [3, 7, 11, 15, 23, 27]
    assert sentinel["checkpoints"] == [19, 31, 35, 39]
    config = wd / "status" / "config.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(f"base_dir: {base}\nruns: {{default: {{rollout: {{num_rollout: 40}}}}}}\n")
    status = subprocess.run([str(Path(sys.executable).with_name("glmsnake")), "status", "--configfile", str(config)],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert "pruned checkpoints: 6 (" in status.stdout and "last iter 27" in status.stdout, status.stdout + status.stderr


def test_a_run_killed_during_pruning_resumes_with_nothing_lost(pruned_run):
    """A pruning pass SIGKILLed half-way through iter 19's files; the run then goes on to 44 rollouts."""
    wd, base, train = pruned_run
    root = base / "runs/default/checkpoints"
    code = (
        "import os, signal\nfrom pathlib import Path\nfrom glmsnake import retention\n"
        "real, seen = os.unlink, [0]\n"
        "def unlink(p, *a, **k):\n    seen[0] += 1\n    if seen[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(p, *a, **k)\n"
        "os.unlink = unlink\n"
        f"retention.prune(Path({str(root)!r}), retention.Policy(3))\n"  # 19 is no longer a milestone to keep
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoints.iterations(root) == [31, 35, 39] and list(root.glob(".deleting_iter_0000019.*"))
    out = train(44)
    assert "checkpoints before this attempt: [31, 35, 39]" in (base / "logs/train.default.log").read_text(), out
    assert checkpoints.iterations(root) == [35, 39, 43]  # last 3 of 31..43; 39 is also a milestone
    assert not list(root.glob(".deleting_*"))  # the next pass removed the leftover
    sentinel = json.loads((base / "runs/default/glmsnake.done.json").read_text())
    assert sentinel["final_iteration"] == 43 and sentinel["lineage"]["resumed_from"] == 39


def test_too_little_room_mid_run_is_a_loud_warning_in_the_log_and_status(tmp_path, pruned_run):
    """On a tmpfs with room for two checkpoints as estimated (the guard passes), but after the first
    save less than two as written: every save warns, the run finishes, `glmsnake status` shows it.
    Two saves in all (iterations 1 and 3), so at most two checkpoints exist whenever pruning runs."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        skip_or_fail("mounting a tmpfs needs root and util-linux's unshare")
    from glmsnake import model_size, resolve
    from test_bad_input import TRAINING_INPUTS, du

    _, base, _ = pruned_run
    inputs = [c for c in TRAINING_INPUTS if (base / c).exists()]  # training alone needs no FP8 folder
    estimate = model_size.checkpoint_bytes(resolve.load({}).preset.model)
    project, mnt = tmp_path / "project", tmp_path / "mnt"
    (project / "config").mkdir(parents=True)
    mnt.mkdir()
    config = project / "config/config.yaml"
    config.write_text(json.dumps({"base_dir": str(mnt), "runs": {"default": {  # JSON is YAML
        "rollout": {"num_rollout": 4}, "train": {"save_interval": 2, "keep_checkpoints": {"last": 1}}}}}))
    size_kib = (sum(du(base / c) for c in inputs) + 2 * estimate) // 1024 + 800  # the guard passes
    sm = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(project),
          "--profile", str(REPO / "profiles/local"), "--cores", "2", "train"]
    status = [str(Path(sys.executable).with_name("glmsnake")), "status", "--configfile", str(config)]
    q = lambda argv: " ".join(shlex.quote(str(a)) for a in argv)  # noqa: E731
    copy = " && ".join(f"cp -a {shlex.quote(str(base / c))} {shlex.quote(str(mnt))}/" for c in inputs)
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(str(mnt))} && {copy} && "
              f"{q(sm)} > {tmp_path}/out.txt 2>&1 && {q(status)} > {tmp_path}/status.txt 2>&1 && "
              f"cp {mnt}/logs/train.default.log {tmp_path}/train.log")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "300", "GLMSNAKE_PRUNE_INTERVAL_S": "0.2"})
    out = (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists() else ""
    assert proc.returncode == 0, out[-5000:] + proc.stderr
    log = (tmp_path / "train.log").read_text()
    assert "[glmsnake] WARNING: only" in log and f"free under {mnt}/runs/default/checkpoints, less than two checkpoints" in log
    status_text = (tmp_path / "status.txt").read_text()
    assert "WARNING: only" in status_text and "the next saves may fail" in status_text, status_text
    assert "pruned checkpoints: 1 (" in status_text and "last iter 1" in status_text, status_text
