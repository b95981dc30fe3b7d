"""The training side: the policy (fp32 master weights), the frozen reference, Adam.

`TrainWorker` starts from the torch_dist conversion (slime's `--ref-load`, also the
initial policy) or, when resuming, from a checkpoint of its own (weights, Adam state and
RNG states, so the continuation is the run that was interrupted). `train` does one
rollout's worth of optimizer steps (`num_steps_per_rollout`, micro-batched), `weights`
hands the current weights to the rollout engine, `save` writes a checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from glmsnake.convert.torch_dist import load_hf_state
from glmsnake.trainer import checkpoints
from glmsnake.trainer.loss import approx_kl, group_advantages, masked_sample_mean, policy_loss, tis_weights
from glmsnake.trainer.policy import load_policy, to_checkpoint_state
from glmsnake.trainer.rollout import Sample
from glmsnake.trainer.settings import TrainerSettings


def pack(samples: list[Sample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded [prompt | response] rows; `mask` marks response tokens at their positions."""
    lens = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    b, t = len(samples), max(lens)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.float32)
    rollout_lp = torch.zeros((b, t), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attn[i, : p + r] = 1
        mask[i, p : p + r] = 1
        rollout_lp[i, p : p + r] = torch.tensor(s.rollout_logprobs)
    return {k: v.to(device) for k, v in
            {"ids": ids, "attn": attn, "mask": mask, "rollout_logp": rollout_lp}.items()}


def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False):
    """log p(token_t | tokens_<t) at every position (0 at position 0), and the entropy."""
    logits = model(input_ids=batch["ids"], attention_mask=batch["attn"]).logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(2, batch["ids"][:, 1:, None]).squeeze(2)
    lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)
    ent = None
    if with_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        ent = torch.cat([torch.zeros_like(ent[:, :1]), ent], 1)
    return lp, ent


class TrainWorker:
    """The training actor of the local backend (run as a Ray actor by the driver)."""

    def __init__(self, settings: TrainerSettings, resume_iteration: int | None, device: str | None = None, threads: int = 1):
        torch.set_num_threads(threads)
        self.s = settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.hf_config = json.loads((Path(settings.hf_dir) / "config.json").read_text())
        from glmsnake.trainer.policy import read_tokenizer

        tok = read_tokenizer(Path(settings.hf_dir))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        t0 = time.perf_counter()
        initial = load_hf_state(Path(settings.torch_dist_dir), self.hf_config)
        self.model, self.extra, self.dtypes = load_policy(self.hf_config, initial)
        self.model.to(self.device).train()
        self.ref = None
        if (settings.grpo.use_kl_loss and settings.grpo.kl_loss_coef > 0) or settings.grpo.kl_coef > 0:
            self.ref, _, _ = load_policy(self.hf_config, initial)
            self.ref.to(self.device).eval().requires_grad_(False)
        del initial
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=settings.optimizer.lr, betas=(settings.optimizer.adam_beta1, settings.optimizer.adam_beta2),
                                     eps=1e-8, weight_decay=settings.optimizer.weight_decay)
        self.rollout_id = 0
        self.steps = 0
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        if resume_iteration is not None:
            self._restore(resume_iteration)
        self.load_seconds = time.perf_counter() - t0

    # ---------------------------------------------------------------- state
    def _restore(self, iteration: int) -> None:
        st = checkpoints.load_trainer_state(Path(self.s.checkpoint_root), iteration)
        self.model.load_state_dict(st["model"], strict=False)  # fp32 master weights
        self.opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng"]["torch"])
        random.setstate(st["rng"]["python"])
        self.rollout_id, self.steps = st["rollout_id"], st["steps"]
        if st["rollout_id"] != iteration + 1:
            raise RuntimeError(f"checkpoint iter {iteration} says next rollout {st['rollout_id']}")

    def start_rollout(self) -> int:
        return self.rollout_id

    def weights(self) -> dict[str, torch.Tensor]:
        # Detached CPU copies: what travels through Ray's object store to the rollout engine.
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items() if "rotary_emb" not in k}

    def save(self, iteration: int) -> str:
        t0 = time.perf_counter()
        state = to_checkpoint_state(self.model.state_dict(), self.extra, self.dtypes)
        trainer_state = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "rollout_id": self.rollout_id,
            "steps": self.steps,
            "iteration": iteration,
        }
        path = checkpoints.save(Path(self.s.checkpoint_root), iteration, state, self.hf_config, trainer_state)
        return json.dumps({"path": str(path), "seconds": time.perf_counter() - t0})

    # ---------------------------------------------------------------- training
    @torch.no_grad()
    def _logprobs(self, model, batch_rows: list[Sample]) -> torch.Tensor:
        out = []
        for i in range(0, len(batch_rows), self.s.micro_batch_size):
            b = pack(batch_rows[i:i + self.s.micro_batch_size], self.pad_id, self.device)
            lp, _ = token_logprobs(model, b, self.s.rollout.rollout_temperature)
            out.append(lp)
        width = max(x.shape[1] for x in out)
        return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in out])

    def train(self, rollout_id: int, samples: list[Sample]) -> dict[str, float]:
        """One rollout: old/ref log-probs, advantages, then num_steps_per_rollout optimizer steps."""
        if rollout_id != self.rollout_id:
            raise RuntimeError(f"trainer is at rollout {self.rollout_id}, asked to train rollout {rollout_id}")
        s = self.s
        t0 = time.perf_counter()
        self.model.eval()  # no dropout in GLM; eval() keeps the MoE router deterministic too
        full = pack(samples, self.pad_id, self.device)
        mask = full["mask"]
        old = self._logprobs(self.model, samples)
        old = torch.nn.functional.pad(old, (0, mask.shape[1] - old.shape[1]))
        rewards = torch.tensor([x.reward for x in samples], dtype=torch.float32, device=self.device)
        groups = torch.tensor([x.group for x in samples], device=self.device)
        adv = group_advantages(rewards, groups)[:, None] * mask * s.advantage_sign
        stats: dict[str, float] = {}
        ref = None
        if self.ref is not None:
            ref = torch.nn.functional.pad(self._logprobs(self.ref, samples), (0, 0))
            ref = torch.nn.functional.pad(ref, (0, mask.shape[1] - ref.shape[1]))
            kl_tok = (old - ref) * mask
            stats["kl_ref"] = float(masked_sample_mean(kl_tok, mask).mean())
            if s.grpo.kl_coef > 0:
                adv = adv - s.grpo.kl_coef * kl_tok
        # The rollout engine's log-probs against ours: ~0 when the weight sync works.
        diff = ((old - full["rollout_logp"]).abs() * mask).sum() / mask.sum().clamp(min=1)
        stats["train_rollout_logprob_abs_diff"] = float(diff)
        n = len(samples)
        steps = s.rollout.steps_per_rollout
        global_bs = max(1, n // steps)
        agg: dict[str, list[float]] = {}
        for step in range(steps):
            idx = list(range(step * global_bs, n if step == steps - 1 else (step + 1) * global_bs))
            self.opt.zero_grad(set_to_none=True)
            for m0 in range(0, len(idx), s.micro_batch_size):
                mi = idx[m0:m0 + s.micro_batch_size]
                b = pack([samples[i] for i in mi], self.pad_id, self.device)
                width = b["ids"].shape[1]
                o, a = old[mi, :width], adv[mi, :width]
                # Entropy always, as slime logs it (train/entropy_loss); in the loss only with entropy_coef.
                lp, ent = token_logprobs(self.model, b, s.rollout.rollout_temperature, with_entropy=True)
                pg, pst = policy_loss(lp, o, a, b["mask"], s.grpo.advantage_estimator, s.grpo.eps_clip, s.grpo.eps_clip_high)
                if s.grpo.use_tis:
                    pg = pg * tis_weights(o, b["rollout_logp"])
                per_sample = masked_sample_mean(pg, b["mask"])
                loss_s = per_sample
                if s.grpo.entropy_coef != 0:
                    loss_s = loss_s - s.grpo.entropy_coef * masked_sample_mean(ent, b["mask"])
                else:
                    ent = ent.detach()  # logged only: nothing of it kept for backward
                if s.grpo.use_kl_loss and s.grpo.kl_loss_coef > 0 and ref is not None:
                    kl = approx_kl(lp, ref[mi, :width], s.kl_loss_type)
                    kls = masked_sample_mean(kl, b["mask"])
                    loss_s = loss_s + s.grpo.kl_loss_coef * kls
                    agg.setdefault("kl_loss", []).extend(kls.tolist())
                # Sum of sample means over the global batch, like slime's default aggregation.
                (loss_s.sum() / len(idx)).backward()
                agg.setdefault("loss", []).extend(loss_s.tolist())
                agg.setdefault("pg_loss", []).extend(per_sample.tolist())
                agg.setdefault("ppo_kl", []).extend(pst["ppo_kl"].tolist())
                agg.setdefault("pg_clipfrac", []).extend(pst["pg_clipfrac"].tolist())
                agg.setdefault("entropy", []).extend(masked_sample_mean(ent.detach(), b["mask"]).tolist())
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad)
            agg.setdefault("grad_norm", []).append(float(gn))
            self.opt.step()
            self.steps += 1
        self.rollout_id += 1
        stats.update({k: sum(v) / len(v) for k, v in agg.items()})
        stats["train_seconds"] = time.perf_counter() - t0
        stats["optimizer_steps"] = self.steps
        return stats
