"""The local backend trainer: rewards, loss math, checkpoints, and real RL runs on Ray.

Nothing is mocked: real Ray (a private cluster on a loopback address), real torch,
the tiny GLM-4-MoE converted to torch_dist by the real converter, real files.
Learning figures measured on the 2-core CPU machine (seed fixed, tiny preset with
lr 1e-2 and 32 rollouts): reward first quarter 0.26 -> last quarter 0.82; with the
advantages flipped 0.12 -> 0.00.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glmsnake import config, resolve
from glmsnake.trainer import checkpoints, metrics
from glmsnake.trainer.data import rollout_batch, tiny_prompts
from glmsnake.trainer.loss import approx_kl, group_advantages, policy_loss, tis_weights
from glmsnake.trainer.rewards import extract_answer, get_reward, math_reward, tiny_reward
from glmsnake.recipe.args import EvalArgs
from glmsnake.steps.train import trainer_settings as from_workflow

REPO = Path(__file__).resolve().parent.parent
# The tiny hyperparameters these tests (and the preset) use.
TINY_RUN = {"rollout": {"num_rollout": 32}, "optimizer": {"lr": 1.0e-2}}
LEARNING_MARGIN = 0.30  # last-quarter minus first-quarter mean reward, measured 0.56
FLIPPED_MAX_RISE = 0.0  # with advantages flipped the reward must not rise at all (measured -0.12)


# --------------------------------------------------------------------------- pure functions


def test_tiny_reward_graded_and_exact():
    assert tiny_reward("c", "c") == 1.0
    assert tiny_reward(" c!", "c") == 1.0
    assert tiny_reward("d", "c") == pytest.approx(1 - 1 / 16)
    assert tiny_reward("~", "c") == 0.0
    assert tiny_reward("", "c") == 0.0
    assert get_reward("tiny") is tiny_reward


@pytest.mark.parametrize("response,label,want", [
    ("so the answer is \\boxed{42}", "42", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("<think>maybe 7</think> The answer is 8.", "8", 1.0),
    ("<think>\\boxed{8}</think> so 9", "8", 0.0),   # only the part after the reasoning counts
    ("we get 1,000 apples", "1000", 1.0),           # last number
    ("\\boxed{x+1", "x+1", 0.0),                     # cut off: unbalanced box
    ("\\boxed{12} then \\boxed{13}", "12", 0.0),     # the last box is the answer
    ("no number here", "3", 0.0),
])
def test_math_reward(response, label, want):
    assert math_reward(response, label) == want
    assert get_reward("deepscaler") is math_reward


def test_extract_answer_nested_braces():
    assert extract_answer("\\boxed{\\sqrt{2}+\\frac{1}{3}}") == "\\sqrt{2}+\\frac{1}{3}"


def test_group_advantages_normalised_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = group_advantages(r, g)
    assert torch.allclose(a[:4], (r[:4] - 0.25) / (r[:4].std() + 1e-6))
    assert torch.equal(a[4:], torch.zeros(4))  # no spread: no signal, no NaN


def test_policy_loss_clipping_grpo_and_gspo():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # token ratios 1.5 and 0.5
    adv = torch.ones(1, 2)
    loss, st = policy_loss(logp, old, adv, mask, "grpo", 0.2, 0.28)
    # A > 0: the ratio is clipped above at 1.28, unclipped below (min of the objectives).
    assert torch.allclose(loss, torch.tensor([[-1.28, -0.5]]))
    assert st["pg_clipfrac"].item() == pytest.approx(0.5)
    loss, _ = policy_loss(logp, old, -adv, mask, "grpo", 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8]]))  # A < 0: clipped below at 0.8
    # GSPO: one ratio per sequence, exp(mean log-ratio) = sqrt(1.5 * 0.5)
    loss, st = policy_loss(logp, old, adv, mask, "gspo", 0.2, 0.28)
    seq = (1.5 * 0.5) ** 0.5
    assert torch.allclose(loss, torch.full((1, 2), -seq))
    assert st["ppo_kl"].item() == pytest.approx(-torch.log(torch.tensor(seq)).item(), abs=1e-6)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, "ppo", 0.2, None)


def test_kl_estimators_and_tis():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = lp - ref
    assert torch.allclose(approx_kl(lp, ref, "k1"), d)
    assert torch.allclose(approx_kl(lp, ref, "k2"), d**2 / 2)
    assert torch.allclose(approx_kl(lp, ref, "low_var_kl"), torch.exp(-d) - 1 + d)
    assert torch.equal(approx_kl(lp, lp, "low_var_kl"), torch.zeros(2))
    assert torch.allclose(tis_weights(torch.tensor([0.0, 5.0]), torch.tensor([0.0, 0.0])), torch.tensor([1.0, 2.0]))


def test_rollout_batches_are_a_function_of_the_rollout_id():
    rows = tiny_prompts(7, n=10)
    a = [rollout_batch(rows, r, 4, True, 3) for r in range(6)]
    assert a == [rollout_batch(rows, r, 4, True, 3) for r in range(6)]
    epoch0 = [x["prompt"] for b in a[:2] for x in b] + [x["prompt"] for x in a[2][:2]]
    assert sorted(epoch0) == sorted(x["prompt"] for x in rows)  # an epoch covers every row once
    assert [x for x in rollout_batch(rows, 0, 4, False, 3)] == rows[:4]


# --------------------------------------------------------------------------- the tiny workflow inputs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """download_hf (tiny), datasets, torch_dist conversion: the train step's real inputs."""
    from glmsnake.steps import weights
    from glmsnake.convert import torch_dist

    root = tmp_path_factory.mktemp("trainer")
    wf = resolve.load({"base_dir": str(root)})
    weights.download_hf(wf, wf.paths.hf_manifest)
    for n in wf.preset.datasets:
        weights.download_dataset(wf, wf.paths.dataset(n), n)
    torch_dist.convert(wf.paths.hf_dir, wf.paths.torch_dist_dir, wf.preset.model)
    return root


def workflow(base: Path, **run) -> config.Workflow:
    return resolve.load({"base_dir": str(base), "runs": {"default": resolve.deep_merge(TINY_RUN, run)}})


def test_policy_state_round_trip_and_checkpoints_never_deleted(base, tmp_path):
    from glmsnake.convert.torch_dist import TRACKER_NAME, load_hf_state, read_hf_config
    from glmsnake.trainer.policy import load_policy, to_checkpoint_state

    wf = workflow(base)
    cfg = read_hf_config(wf.paths.hf_dir)
    ckpt = load_hf_state(wf.paths.torch_dist_dir, cfg)
    model, extra, dtypes = load_policy(cfg, ckpt)
    assert any(k.startswith("model.layers.3.") for k in extra)  # the MTP layer is carried along
    back = to_checkpoint_state(model.state_dict(), extra, dtypes)
    assert set(back) == set(ckpt) and all(torch.equal(back[k], ckpt[k]) for k in ckpt)

    root = tmp_path / "ck"
    for it in (3, 7):
        checkpoints.save(root, it, back, cfg, {"rollout_id": it + 1, "marker": it})
    assert checkpoints.iterations(root) == [3, 7]
    assert (root / TRACKER_NAME).read_text() == "7"
    again = checkpoints.save(root, 3, back, cfg, {"rollout_id": 99})  # an existing checkpoint is kept as is
    assert checkpoints.load_trainer_state(root, 3)["marker"] == 3 and again == root / "iter_0000003"
    # A half-written stage and a stale tracker (a kill between rename and tracker write):
    (root / ".stage_iter_0000011" / "iter_0000011").mkdir(parents=True)
    (root / TRACKER_NAME).write_text("3")
    assert checkpoints.latest(root) == 7 and (root / TRACKER_NAME).read_text() == "7"
    loaded = load_hf_state(root, cfg)
    assert all(torch.equal(loaded[k], ckpt[k]) for k in ckpt)


# --------------------------------------------------------------------------- real runs on Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from glmsnake.trainer.driver import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()
    import shutil

    from glmsnake.trainer.driver import local_ray_tmp

    shutil.rmtree(local_ray_tmp(), ignore_errors=True)


def run_loop(settings):
    from glmsnake.trainer.loop import Loop

    out = Loop(settings, log=lambda m: None).run()
    return out, metrics.read(settings.paths.metrics)


def quarters(records) -> tuple[float, float]:
    ro = metrics.rollouts(records)
    q = len(ro) // 4
    return (sum(r["rollout/raw_reward"] for r in ro[:q]) / q, sum(r["rollout/raw_reward"] for r in ro[-q:]) / q)


@pytest.fixture(scope="module")
def learned(base, ray_local):
    s = from_workflow(workflow(base), "default")
    return s, *run_loop(s)


def test_learning_is_real(learned):
    s, out, records = learned
    first, last = quarters(records)
    print(f"reward first quarter {first:.3f} -> last quarter {last:.3f}")
    assert last - first >= LEARNING_MARGIN, (first, last)
    ro = metrics.rollouts(records)
    assert [r["rollout_id"] for r in ro] == list(range(s.rollout.num_rollout))
    # Weights flowed after every step: rollout r sampled with the weights of version r, and the
    # sampler's log-probs equal the trainer's (same weights) up to float noise.
    assert [r["rollout/weight_version"] for r in ro] == list(range(s.rollout.num_rollout))
    assert max(r["train/train_rollout_logprob_abs_diff"] for r in ro) < 1e-4
    # slime's names where slime logs the same metric (rollout/, train/, perf/, eval/<set>).
    for key in ("rollout/raw_reward_std", "rollout/response_len/mean", "train/loss", "train/ppo_kl", "train/grad_norm",
                "train/pg_clipfrac", "perf/samples_per_s", "perf/rollout_samples_per_s", "perf/train_samples_per_s",
                "perf/update_weights_time", "perf/actor_train_time"):
        assert all(key in r for r in ro), key
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["trained_rollouts"] for e in evals] == [0, 8, 16, 24, 32]  # eval_interval 8, and before training
    assert evals[-1]["eval/eval"] > evals[0]["eval/eval"] + 0.2 and "eval/eval/response_len/mean" in evals[-1]
    assert not [k for r in records for k in r if "/" not in k and k not in ("kind", "rollout_id", "trained_rollouts", "time")]
    assert checkpoints.iterations(Path(s.checkpoint_root)) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert out["final_iteration"] == 31
    assert s.paths.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flipped_advantages_do_not_learn(base, ray_local):
    wf = resolve.load({"base_dir": str(base), "runs": {"flipped": TINY_RUN}})
    s = from_workflow(wf, "flipped").replace(advantage_sign=-1.0, eval=EvalArgs())
    _, records = run_loop(s)
    first, last = quarters(records)
    print(f"flipped: reward first quarter {first:.3f} -> last quarter {last:.3f}")
    assert last - first <= FLIPPED_MAX_RISE, (first, last)


def test_gspo_kl_entropy_tis_multi_step(base, ray_local):
    """Every loss term switched on, two optimizer steps per rollout (off-policy second step)."""
    grpo = {"advantage_estimator": "gspo", "use_kl_loss": True, "kl_loss_coef": 0.01, "kl_loss_type": "low_var_kl",
            "kl_coef": 0.01, "entropy_coef": 0.001, "use_tis": True, "eps_clip": 1e-4, "eps_clip_high": 2e-4}
    wf = resolve.load({"base_dir": str(base), "runs": {"gspo": {
        "rollout": {"num_rollout": 3, "num_steps_per_rollout": 2}, "grpo": grpo, "perf": {"micro_batch_size": 8},
        "optimizer": {"lr": 1e-2}, "train": {"save_interval": 2}}}})
    s = from_workflow(wf, "gspo")
    out, records = run_loop(s)
    ro = metrics.rollouts(records)
    assert [r["train/step"] for r in ro] == [2, 4, 6]
    assert all(k in ro[-1] for k in ("rollout/kl_ref", "train/kl_loss", "train/entropy_loss"))
    assert ro[0]["rollout/kl_ref"] == pytest.approx(0, abs=1e-6)  # policy == reference before the first step
    assert ro[-1]["rollout/kl_ref"] > 0
    assert ro[-1]["train/pg_clipfrac"] > 0  # tiny GSPO clip range: the second step is clipped
    assert checkpoints.iterations(Path(s.checkpoint_root)) == [1, 2]  # every 2, and the last


def test_tensorboard_and_offline_wandb_get_every_metric_under_slimes_names(base, ray_local, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    wf = resolve.load({"base_dir": str(base), "runs": {"tracked": {
        "rollout": {"num_rollout": 3}, "train": {"save_interval": 3},
        "tracking": {"use_tensorboard": True, "use_wandb": True, "wandb_mode": "offline", "wandb_project": "tiny"}}}})
    s = from_workflow(wf, "tracked")
    _, records = run_loop(s)
    ro, ev = metrics.rollouts(records), [r for r in records if r["kind"] == "eval"]
    assert [r["rollout_id"] for r in ro] == [0, 1, 2] and [e["trained_rollouts"] for e in ev] == [0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(s.paths.tensorboard))
    acc.Reload()
    for key in ("rollout/raw_reward", "rollout/response_len/mean", "train/pg_clipfrac", "train/grad_norm",
                "perf/samples_per_s"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 1, 2], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in ro], rel=1e-6), key
    assert [(e.step, e.value) for e in acc.Scalars("eval/eval")] == [(0, pytest.approx(ev[0]["eval/eval"]))]

    runs = list((s.paths.wandb / "wandb").glob(f"offline-run-*-{s.wandb_run_id}"))
    assert len(runs) == 1, list(s.paths.wandb.rglob("*"))
    from wandb_log import history

    rows = history(runs[0])
    logged = [r for r in rows if "rollout/raw_reward" in r]
    assert [r["rollout/step"] for r in logged] == [0, 1, 2]
    assert [r["rollout/raw_reward"] for r in logged] == pytest.approx([r["rollout/raw_reward"] for r in ro])
    assert all({"train/grad_norm", "train/pg_clipfrac", "perf/samples_per_s"} <= set(r) for r in logged)
    assert [r["eval/eval"] for r in rows if "eval/eval" in r] == pytest.approx([ev[0]["eval/eval"]])


# --------------------------------------------------------------------------- kill, resume, step, export


def _driver_cmd(settings_path: Path) -> list[str]:
    return [sys.executable, "-m", "glmsnake.trainer.driver", "--settings", str(settings_path)]


def test_killed_run_resumes_from_its_checkpoint_then_step_and_export(base, learned, tmp_path):
    """Kill the driver (and its private Ray) after a checkpoint; the train step's next attempt
    resumes from it, the metrics continue, no checkpoint is deleted, and the result equals the
    uninterrupted run exactly (same prompts, same sampling seeds, restored Adam and RNG)."""
    from glmsnake.steps.export import export_hf as step_export
    from glmsnake.steps.train import train_run as step, write_settings

    s_ref, _, ref_records = learned
    # Every checkpoint kept (slime's behaviour): "nothing deleted" is this test's to assert.
    wf = resolve.load({"base_dir": str(base), "runs": {"resumed": {**TINY_RUN, "train": {"keep_checkpoints": None}}}})
    settings, path = write_settings(wf, "resumed")
    ck = Path(settings.checkpoint_root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "attempt1.log", "w")
    proc = subprocess.Popen(_driver_cmd(path), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while checkpoints.latest(ck) is None or checkpoints.latest(ck) < 11:
            assert proc.poll() is None, (tmp_path / "attempt1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint 11 in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's session: it and the Ray it started
        proc.wait()
        import shutil

        shutil.rmtree(f"/tmp/gsray{proc.pid}", ignore_errors=True)  # the killed private Ray's temp dir
    at_kill = checkpoints.iterations(ck)
    assert at_kill[-1] < settings.rollout.num_rollout - 1, "the run finished before it could be killed"
    done_before = metrics.rollouts(metrics.read(settings.paths.metrics))
    print(f"killed with checkpoints {at_kill}, {len(done_before)} rollouts logged")

    sentinel = wf.paths.run("resumed").root / "glmsnake.done.json"
    step(wf, sentinel, "resumed")
    rec = json.loads(sentinel.read_text())
    assert rec["final_iteration"] == settings.rollout.num_rollout - 1
    assert rec["config_hash"] == wf.config_hash("resumed")
    assert set(at_kill) <= set(rec["checkpoints"])  # nothing deleted
    assert set(at_kill) <= set(checkpoints.iterations(ck))
    assert {"torch", "transformers", "ray"} <= set(rec["versions"])
    records = metrics.read(settings.paths.metrics)
    ro = metrics.rollouts(records)
    assert [r["rollout_id"] for r in ro] == list(range(settings.rollout.num_rollout))  # continued, not restarted
    # Rollouts before the checkpoint kept their original lines (timestamps of the first attempt).
    first_attempt = {r["rollout_id"]: r["time"] for r in done_before}
    assert all(ro[i]["time"] == first_attempt[i] for i in range(at_kill[-1] + 1))
    ref = metrics.rollouts(ref_records)
    assert [r["rollout/raw_reward"] for r in ro] == [r["rollout/raw_reward"] for r in ref]  # a faithful resume
    assert ro[-1]["train/grad_norm"] == pytest.approx(ref[-1]["train/grad_norm"], rel=1e-6)
    assert rec["metrics_summary"]["reward_last_quarter"] == pytest.approx(quarters(ref_records)[1])

    # export_hf: the final checkpoint back to an HF folder that transformers loads.
    out_sentinel = wf.paths.run("resumed").root / "hf" / "glmsnake.done.json"
    step_export(wf, out_sentinel, "resumed")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wf.paths.run("resumed").root / "hf")
    ids = torch.tensor([[86, 68, 92, 3, 70, 29]])  # "say c:"
    assert torch.isfinite(model(ids).logits).all()


def test_a_damaged_checkpoint_is_named_and_set_aside_so_the_resume_uses_the_one_before(learned, tmp_path):
    import shutil

    s, _, _ = learned
    root = shutil.copytree(s.checkpoint_root, tmp_path / "checkpoints")
    assert checkpoints.latest(root) == 31
    shard = root / "iter_0000031" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    state = root / "iter_0000027" / checkpoints.TRAINER_STATE
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size // 2)
    moved = checkpoints.set_aside_damaged(root)
    assert [(i, d) for i, _, d in moved] == [(31, root / "damaged/iter_0000031"), (27, root / "damaged/iter_0000027")]
    size = (root / "damaged/iter_0000031/__0_0.distcp").stat().st_size
    [problem] = moved[0][1]
    assert problem.startswith(f"{shard}: {size} bytes, its index needs ") and int(problem.split()[-1]) > size
    assert moved[1][1] == [f"{state}: truncated or not a torch checkpoint"]
    assert checkpoints.latest(root) == 23 and (root / "latest_checkpointed_iteration.txt").read_text() == "23"
    assert (root / "damaged/iter_0000031/__0_0.distcp").is_file()  # moved, never deleted
    assert checkpoints.set_aside_damaged(root) == []  # the intact ones stay


def test_a_failed_driver_leaves_no_ray_temp_folder_and_keeps_rays_logs(base, tmp_path):
    """The private Ray of a failed local run: its temp folder goes, its logs stay with the run."""
    wf = resolve.load({"base_dir": str(base), "runs": {"broken": TINY_RUN}})
    s = from_workflow(wf, "broken").replace(torch_dist_dir=str(tmp_path / "no such checkpoint"),
                                           run_dir=str(tmp_path / "run"))
    path = tmp_path / "settings.json"
    path.write_text(s.to_json())
    proc = subprocess.Popen(_driver_cmd(path), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]
    assert not Path(f"/tmp/gsray{proc.pid}").exists()
    kept = tmp_path / "run" / "logs" / f"ray-{proc.pid}"
    assert kept.is_dir() and any(kept.rglob("raylet*")), out[-2000:]
    assert f"[trainer] Ray's logs of this attempt: {kept}" in out
