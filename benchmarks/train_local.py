"""Throughput of the local backend trainer on the tiny preset: rollout vs train, and the weight sync.

    python benchmarks/train_local.py [--rollouts 16] [--batch 8] [--n 4] [--max-len 4] [--base DIR] [--json OUT]

Prepares the tiny inputs (HF checkpoint, datasets, torch_dist conversion) in a temporary folder
unless --base points at a workflow base that has them, starts a private Ray on a loopback
address, runs the trainer loop (no eval, no checkpoints besides the last) and reports, over
the rollouts after the first (warm-up):
- rollout samples/s (generation + reward), train samples/s (log-probs + optimizer steps),
  end-to-end samples/s;
- the weight sync per step (trainer -> Ray object store -> rollout engine), in ms and as a
  share of the step; and, measured separately `--syncs` times, its split into the trainer's
  state_dict copy + transfer and the rollout engine's load_state_dict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prepare(base: Path) -> None:
    from glmsnake import resolve
    from glmsnake.steps import weights
    from glmsnake.convert import torch_dist

    wf = resolve.load({"base_dir": str(base)})
    if not (wf.paths.torch_dist_dir / "latest_checkpointed_iteration.txt").is_file():
        weights.download_hf(wf, wf.paths.hf_manifest)
        for n in wf.preset.datasets:
            weights.download_dataset(wf, wf.paths.dataset(n), n)
        torch_dist.convert(wf.paths.hf_dir, wf.paths.torch_dist_dir, wf.preset.model)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="rollout_batch_size (prompts per rollout)")
    p.add_argument("--n", type=int, default=4, help="n_samples_per_prompt")
    p.add_argument("--max-len", type=int, default=4, help="rollout_max_response_len")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--syncs", type=int, default=10)
    p.add_argument("--base", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-ray", action="store_true",
                   help="workers as plain objects in this process (where Ray is not installed, e.g. the H200 image)")
    args = p.parse_args()
    if args.no_ray:
        return in_process(args)

    import ray

    from glmsnake import resolve
    from glmsnake.trainer.actor import TrainWorker
    from glmsnake.trainer.driver import init_ray
    from glmsnake.trainer.loop import Loop, actor_options
    from glmsnake.trainer.rollout import RolloutWorker
    from glmsnake.recipe.args import EvalArgs
    from glmsnake.steps.train import trainer_settings as from_workflow

    base = args.base or Path(tempfile.mkdtemp(prefix="gs_bench_"))
    t0 = time.perf_counter()
    prepare(base)
    prep_s = time.perf_counter() - t0
    wf = resolve.load({"base_dir": str(base), "runs": {"bench": {
        "rollout": {"num_rollout": args.rollouts, "rollout_batch_size": args.batch, "n_samples_per_prompt": args.n,
                    "rollout_max_response_len": args.max_len},
        "perf": {"micro_batch_size": args.micro_batch},
        "optimizer": {"lr": 1e-2}, "train": {"save_interval": 10**6}}}})
    s = from_workflow(wf, "bench").replace(eval=EvalArgs())
    import shutil

    shutil.rmtree(s.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    init_ray(None, num_cpus=2)
    ray_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = Loop(s, log=lambda m: None)
    loop.run()
    run_s = time.perf_counter() - t0
    from glmsnake.trainer import metrics

    ro = metrics.rollouts(metrics.read(s.paths.metrics))[1:]
    med = lambda k: statistics.median(r[k] for r in ro)  # noqa: E731
    step_s = [r["perf/rollout_time"] + r["perf/actor_train_time"] + r["perf/update_weights_time"] for r in ro]

    # The sync alone, repeated: state_dict copy + object store + load_state_dict.
    t_opts, r_opts = actor_options(ray)
    trainer = ray.remote(TrainWorker).options(**t_opts).remote(s, None)
    rollout = ray.remote(RolloutWorker).options(**r_opts).remote(s)
    ray.get([trainer.start_rollout.remote(), rollout.update_weights.remote({}, 0)])
    total, load = [], []
    for i in range(args.syncs):
        t0 = time.perf_counter()
        load.append(ray.get(rollout.update_weights.remote(trainer.weights.remote(), i)))
        total.append(time.perf_counter() - t0)
    nbytes = sum(v.numel() * v.element_size() for v in ray.get(trainer.weights.remote()).values())
    ray.shutdown()

    out = {
        "device": "cuda" if __import__("torch").cuda.is_available() else "cpu",
        "samples_per_rollout": args.batch * args.n,
        "max_response_len": args.max_len,
        "rollouts_measured": len(ro),
        "rollout_samples_per_s": med("perf/rollout_samples_per_s"),
        "train_samples_per_s": med("perf/train_samples_per_s"),
        "samples_per_s": med("perf/samples_per_s"),
        "rollout_tokens_per_s": med("perf/tokens_per_s"),
        "sync_ms_per_step": 1e3 * med("perf/update_weights_time"),
        "sync_share_of_step": statistics.median(r["perf/update_weights_time"] / t for r, t in zip(ro, step_s)),
        "sync_isolated_ms": 1e3 * statistics.median(total),
        "sync_load_state_dict_ms": 1e3 * statistics.median(load),
        "weights_mb": nbytes / 2**20,
        "prepare_s": prep_s, "ray_init_s": ray_s, "loop_s_incl_actor_start": run_s,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def in_process(args) -> int:
    """The same loop body without Ray: the weight sync is the state_dict copy and load alone."""
    import shutil

    import torch

    from glmsnake import resolve
    from glmsnake.trainer.actor import TrainWorker
    from glmsnake.trainer.data import read_jsonl, rollout_batch
    from glmsnake.trainer.rollout import RolloutWorker, sampling_seed
    from glmsnake.recipe.args import EvalArgs
    from glmsnake.steps.train import trainer_settings as from_workflow

    base = args.base or Path(tempfile.mkdtemp(prefix="gs_bench_"))
    prepare(base)
    wf = resolve.load({"base_dir": str(base), "runs": {"bench": {
        "rollout": {"num_rollout": args.rollouts, "rollout_batch_size": args.batch, "n_samples_per_prompt": args.n,
                    "rollout_max_response_len": args.max_len},
        "perf": {"micro_batch_size": args.micro_batch}, "optimizer": {"lr": 1e-2}}}})
    s = from_workflow(wf, "bench").replace(eval=EvalArgs())
    shutil.rmtree(s.run_dir, ignore_errors=True)
    threads = max(1, (torch.get_num_threads()))
    trainer, rollout = TrainWorker(s, None, threads=threads), RolloutWorker(s, threads=threads)
    cuda = trainer.device.type == "cuda"
    sync_dev = lambda: torch.cuda.synchronize() if cuda else None  # noqa: E731
    rollout.update_weights(trainer.weights(), 0)
    rows = read_jsonl(Path(s.prompt_data), s.rollout.input_key, s.rollout.label_key)
    rec = []
    for r in range(s.rollout.num_rollout):
        batch = rollout_batch(rows, r, s.rollout.rollout_batch_size, False, s.rollout_seed)
        t0 = time.perf_counter()
        samples, _ = rollout.generate(batch, s.rollout.n_samples_per_prompt, s.rollout.rollout_max_response_len,
                                      s.rollout.rollout_temperature, sampling_seed(s.rollout_seed, r))
        sync_dev()
        t1 = time.perf_counter()
        trainer.train(r, samples)
        sync_dev()
        t2 = time.perf_counter()
        rollout.update_weights(trainer.weights(), r + 1)
        sync_dev()
        t3 = time.perf_counter()
        rec.append((len(samples), t1 - t0, t2 - t1, t3 - t2, sum(x.reward for x in samples) / len(samples)))
    rec = rec[1:]
    n = rec[0][0]
    med = lambda i: statistics.median(x[i] for x in rec)  # noqa: E731
    out = {
        "mode": "in-process (no Ray)", "device": str(trainer.device),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "samples_per_rollout": n, "max_response_len": args.max_len, "rollouts_measured": len(rec),
        "rollout_samples_per_s": n / med(1), "train_samples_per_s": n / med(2),
        "samples_per_s": n / statistics.median(x[1] + x[2] + x[3] for x in rec),
        "sync_ms_per_step": 1e3 * med(3),
        "sync_share_of_step": statistics.median(x[3] / (x[1] + x[2] + x[3]) for x in rec),
        "reward_first_last": [rec[0][4], rec[-1][4]],
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
