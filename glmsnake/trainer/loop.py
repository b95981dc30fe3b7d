"""The driver's loop, shaped like slime's train.py: rollout -> train -> weight sync, repeat.

Per rollout id r (from the latest checkpoint's iteration to num_rollout - 1):
  1. the rollout actor samples n_samples_per_prompt responses for rollout_batch_size
     prompts with the weights of version r and scores them;
  2. the training actor turns them into advantages and optimizer steps;
  3. the new weights go to the rollout actor (version r + 1);
  4. the metrics line is appended; eval runs before rollout 0 and every eval_interval rollouts;
  5. every save_interval rollouts (and after the last one) the training actor writes iter_{r}
     (slime's numbering: the checkpoint of rollout r is iteration r; a resume starts at r + 1),
     and the curves are redrawn (at most every PLOT_EVERY_S, always at the end).
The order of 4 and 5 is what makes resume exact: a checkpoint at N implies the metrics
of every rollout before N are on disk.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

from glmsnake.trainer import checkpoints, metrics
from glmsnake.trainer import metric_names as names
from glmsnake.trainer import tracking
from glmsnake.trainer.data import read_jsonl, rollout_batch
from glmsnake.trainer.rollout import sampling_seed
from glmsnake.trainer.settings import TrainerSettings


# The curves are redrawn at a save at most this often, and always after the last rollout: a
# drawing costs about a second, while a tiny model's saves come every second.
PLOT_EVERY_S = 30.0


def actor_options(ray) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ray resources for (trainer, rollout): a GPU each where the cluster has them, as slime places
    actors on GPUs; CPU-only clusters get one CPU each when there are two."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 0)
    opt: dict[str, Any] = {"num_cpus": 1 if cpus >= 2 else 0}
    if gpus >= 2:
        opt["num_gpus"] = 1
    elif gpus >= 1:
        opt["num_gpus"] = 0.5  # colocated on one GPU
    return dict(opt), dict(opt)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


class Loop:
    def __init__(self, settings: TrainerSettings, log: Callable[[str], None] = print):
        self.s = settings
        self.log = log
        self.sinks: tracking.Sinks | None = None  # TensorBoard, W&B: open while an attempt trains

    def run(self) -> dict[str, Any]:
        import ray

        from glmsnake.trainer.actor import TrainWorker
        from glmsnake.trainer.rollout import RolloutWorker

        s = self.s
        Path(s.run_dir).mkdir(parents=True, exist_ok=True)
        ckroot = Path(s.checkpoint_root)
        resume = checkpoints.latest(ckroot)
        start = 0 if resume is None else resume + 1
        kept = metrics.truncate_to(s.paths.metrics, start)
        self.log(f"[trainer] run {s.run}: checkpoints {checkpoints.iterations(ckroot)}; "
                 f"{'resuming from iter ' + str(resume) if resume is not None else 'starting from the torch_dist weights'}")
        if start >= s.rollout.num_rollout:
            metrics.plot(kept, s.paths.plot, s.run)
            return {"start": start, "final_iteration": resume, **metrics.summary(kept)}
        with tracking.Sinks(s) as self.sinks:
            t_opts, r_opts = actor_options(ray)
            trainer = ray.remote(TrainWorker).options(**t_opts).remote(s, resume)
            rollout = ray.remote(RolloutWorker).options(**r_opts).remote(s)
            got = ray.get(trainer.start_rollout.remote())
            if got != start:
                raise RuntimeError(f"trainer restored rollout {got}, expected {start}")
            self.sync(trainer, rollout, start)
            rows = read_jsonl(Path(s.prompt_data), s.rollout.input_key, s.rollout.label_key)
            evals = {n: read_jsonl(Path(p), s.rollout.input_key, s.rollout.label_key) for n, p in s.eval_data.items()}
            if evals and s.eval.eval_interval and start % s.eval.eval_interval == 0 \
                    and not any(r.get("kind") == "eval" and r["trained_rollouts"] == start for r in kept):
                self.evaluate(rollout, evals, start)
            plotted = time.monotonic()
            for r in range(start, s.rollout.num_rollout):
                self.one_rollout(trainer, rollout, rows, r)
                if evals and s.eval.eval_interval and (r + 1) % s.eval.eval_interval == 0:
                    self.evaluate(rollout, evals, r + 1)
                last = r + 1 == s.rollout.num_rollout
                if (r + 1) % s.save_interval == 0 or last:
                    info = ray.get(trainer.save.remote(r))
                    self.log(f"[trainer] saved iter {r}: {info}")
                    if last or time.monotonic() - plotted >= PLOT_EVERY_S:
                        metrics.plot(metrics.read(s.paths.metrics), s.paths.plot, s.run)
                        plotted = time.monotonic()
        records = metrics.read(s.paths.metrics)
        return {"start": start, "final_iteration": checkpoints.latest(ckroot), **metrics.summary(records)}

    def sync(self, trainer, rollout, version: int) -> float:
        """Trainer -> rollout weights through Ray's object store; returns seconds."""
        import ray

        t0 = time.perf_counter()
        ray.get(rollout.update_weights.remote(trainer.weights.remote(), version))
        return time.perf_counter() - t0

    def one_rollout(self, trainer, rollout, rows: list[dict[str, Any]], r: int) -> dict[str, Any]:
        import ray

        s = self.s
        batch = rollout_batch(rows, r, s.rollout.rollout_batch_size, s.rollout.rollout_shuffle, s.rollout_seed)
        t0 = time.perf_counter()
        samples, ginfo = ray.get(rollout.generate.remote(
            batch, s.rollout.n_samples_per_prompt, s.rollout.rollout_max_response_len, s.rollout.rollout_temperature,
            sampling_seed(s.rollout_seed, r)))
        t1 = time.perf_counter()
        stats = ray.get(trainer.train.remote(r, samples))
        t2 = time.perf_counter()
        sync_s = self.sync(trainer, rollout, r + 1)
        rewards = [x.reward for x in samples]
        lens = [len(x.response_ids) for x in samples]
        n = len(samples)
        rec = {
            "kind": "rollout",
            "rollout_id": r,
            names.REWARD: _mean(rewards),
            names.REWARD_STD: statistics.pstdev(rewards) if n > 1 else 0.0,
            "rollout/raw_reward_max": max(rewards),
            "rollout/accuracy": _mean([float(x >= 1.0) for x in rewards]),  # exact answers, for 0/1 rewards
            names.RESPONSE_LEN: _mean(lens),
            "rollout/truncated_ratio": _mean([float(x.truncated) for x in samples]),
            "rollout/n_samples": n,
            "rollout/weight_version": ginfo["weight_version"],
            "perf/rollout_time": t1 - t0,
            "perf/actor_train_time": t2 - t1,
            "perf/update_weights_time": sync_s,
            "perf/rollout_samples_per_s": n / (t1 - t0),
            "perf/train_samples_per_s": n / (t2 - t1),
            names.SAMPLES_PER_S: n / (t2 - t0 + sync_s),
            "perf/tokens_per_s": ginfo["tokens"] / (t1 - t0),
            "time": time.time(),
            **{names.TRAIN.get(k, f"train/{k}"): v for k, v in stats.items() if k != "train_seconds"},
        }
        metrics.append(s.paths.metrics, rec)
        if self.sinks is not None:
            self.sinks.log(rec)
        self.log(f"[trainer] rollout {r}: reward {rec[names.REWARD]:.3f} ± {rec[names.REWARD_STD]:.3f} "
                 f"loss {rec.get('train/loss', 0):+.4f} len {rec[names.RESPONSE_LEN]:.2f} "
                 f"({rec[names.SAMPLES_PER_S]:.1f} samples/s, sync {sync_s * 1e3:.0f} ms)")
        return rec

    def evaluate(self, rollout, evals: dict[str, list[dict[str, Any]]], step: int) -> dict[str, Any]:
        import ray

        s = self.s
        rec: dict[str, Any] = {"kind": "eval", "trained_rollouts": step, "time": time.time()}
        for i, (name, rows) in enumerate(sorted(evals.items())):
            samples, info = ray.get(rollout.generate.remote(
                rows, s.eval.n_samples_per_eval_prompt, s.eval.eval_max_response_len or s.rollout.rollout_max_response_len,
                s.rollout.rollout_temperature, sampling_seed(s.rollout_seed, step, salt=1 + i)))
            rec[f"eval/{name}"] = _mean([x.reward for x in samples])  # slime's name for the mean eval reward
            rec[f"eval/{name}/response_len/mean"] = _mean([len(x.response_ids) for x in samples])
            rec[f"eval/{name}/seconds"] = info["seconds"]
        metrics.append(s.paths.metrics, rec)
        if self.sinks is not None:
            self.sinks.log(rec)
        self.log(f"[trainer] eval after {step} rollouts: "
                 + ", ".join(f"eval/{k} reward {rec[f'eval/{k}']:.3f}" for k in names.eval_sets(rec)))
        return rec
