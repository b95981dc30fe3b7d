"""GRPO/GSPO advantages and the PPO-style clipped policy loss, with slime's meanings.

- Advantages (`grpo`, `gspo`): per prompt group, reward minus the group mean, divided by
  the group std (+1e-6); the same value for every response token.
- `kl_coef` > 0: a per-token KL-in-reward penalty, `A_t -= kl_coef * (logp_old - logp_ref)_t`.
- Policy loss: ratio r = exp(logp - logp_old) per token (`grpo`) or per sequence
  (`gspo`: exp of the mean token log-ratio of the sequence, broadcast to its tokens);
  loss_t = max(-A r, -A clip(r, 1 - eps_clip, 1 + eps_clip_high)).
- `use_tis`: the loss is weighted by min(exp(logp_old - logp_rollout), 2): truncated
  importance sampling against the rollout engine's own log-probs.
- KL loss (`use_kl_loss`, `kl_loss_coef`): k1, k2 or k3/low_var_kl (k3 clamped to [-10, 10]
  for low_var_kl) between the policy and the reference.
- Aggregation: mean over each sample's response tokens, then mean over the samples of the
  step's global batch (slime's default, not per-token).
"""

from __future__ import annotations

import torch

TIS_CLIP = 2.0


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, normalize_std: bool = True) -> torch.Tensor:
    adv = torch.empty_like(rewards)
    for g in groups.unique():
        idx = groups == g
        r = rewards[idx]
        a = r - r.mean()
        if normalize_std and r.numel() > 1:
            a = a / (r.std() + 1e-6)
        adv[idx] = a
    return adv


def approx_kl(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str) -> torch.Tensor:
    log_ratio = logp.float() - logp_ref.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return log_ratio**2 / 2
    if kind in ("k3", "low_var_kl"):
        kl = torch.exp(-log_ratio) - 1 + log_ratio
        return kl.clamp(-10, 10) if kind == "low_var_kl" else kl
    raise ValueError(f"unknown kl_loss_type {kind!r}")


def masked_sample_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over its response tokens: [B, T] -> [B]."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                estimator: str, eps_clip: float, eps_clip_high: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped loss [B, T] and per-sample stats (ppo_kl, clipfrac) [B]."""
    if estimator == "gspo":
        seq = masked_sample_mean(old_logp - logp, mask)          # [B]
        ppo_kl = seq[:, None].expand_as(logp)
    elif estimator == "grpo":
        ppo_kl = old_logp - logp
    else:
        raise ValueError(f"the local trainer supports advantage_estimator grpo|gspo, not {estimator!r}")
    ratio = torch.exp(-ppo_kl)
    hi = eps_clip if eps_clip_high is None else eps_clip_high
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - eps_clip, 1 + hi)
    loss = torch.maximum(l1, l2)
    clipped = (l2 > l1).float()
    return loss, {"ppo_kl": masked_sample_mean(ppo_kl.detach(), mask),
                  "pg_clipfrac": masked_sample_mean(clipped, mask)}


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    return torch.exp(old_logp - rollout_logp).clamp(max=TIS_CLIP)
