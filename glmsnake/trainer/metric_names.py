"""The names metrics go by: slime's where slime logs the same quantity, ours in the same namespaces.

slime logs `rollout/*` (samples: raw_reward, response_len/mean, truncated_ratio), `train/*`
(loss, pg_loss, ppo_kl, pg_clipfrac, kl_loss, entropy_loss, grad_norm), `eval/<set>` (the mean
reward) with `eval/<set>/response_len/mean`, and `perf/*`. So do metrics.jsonl, TensorBoard and
W&B here; lines written under the old flat names are read back under these.
"""

from __future__ import annotations

from typing import Any

REWARD = "rollout/raw_reward"
REWARD_STD = "rollout/raw_reward_std"
RESPONSE_LEN = "rollout/response_len/mean"
KL_REF = "rollout/kl_ref"  # the rollout policy's KL to the reference: slime's rollout/log_probs - ref_log_probs
SAMPLES_PER_S = "perf/samples_per_s"

# What the trainer's train() returns, under slime's train/ names.
TRAIN = {
    "loss": "train/loss", "pg_loss": "train/pg_loss", "ppo_kl": "train/ppo_kl", "pg_clipfrac": "train/pg_clipfrac",
    "kl_loss": "train/kl_loss", "entropy": "train/entropy_loss", "grad_norm": "train/grad_norm",
    "train_rollout_logprob_abs_diff": "train/train_rollout_logprob_abs_diff", "kl_ref": KL_REF,
    "optimizer_steps": "train/step",
}

# The flat names of earlier versions, for metrics.jsonl lines written before the rename.
_OLD = {
    **TRAIN,
    "reward_mean": REWARD, "reward_std": REWARD_STD, "reward_max": "rollout/raw_reward_max",
    "reward_exact_ratio": "rollout/accuracy", "response_len_mean": RESPONSE_LEN,
    "truncated_ratio": "rollout/truncated_ratio", "n_samples": "rollout/n_samples",
    "weight_version": "rollout/weight_version", "rollout_seconds": "perf/rollout_time",
    "train_seconds": "perf/actor_train_time", "sync_seconds": "perf/update_weights_time",
    "rollout_samples_per_s": "perf/rollout_samples_per_s", "train_samples_per_s": "perf/train_samples_per_s",
    "samples_per_s": SAMPLES_PER_S, "tokens_per_s": "perf/tokens_per_s",
}


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record with today's names (a line of an earlier version is renamed, nothing is lost)."""
    out = {}
    for k, v in record.items():
        if k.startswith("eval/") and k.endswith("/reward_mean"):
            k = k.removesuffix("/reward_mean")
        elif k.startswith("eval/") and k.endswith("/response_len_mean"):
            k = k.removesuffix("_mean") + "/mean"
        out[_OLD.get(k, k)] = v
    return out


def eval_sets(record: dict[str, Any]) -> list[str]:
    """The eval sets of an eval record: `eval/<set>` keys that hold the mean reward."""
    return sorted(k.removeprefix("eval/") for k in record if k.startswith("eval/") and k.count("/") == 1)
