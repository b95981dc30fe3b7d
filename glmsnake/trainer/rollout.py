"""The rollout side: sampling with the HF model (SGLang's role in slime) and rule rewards.

`RolloutWorker` holds a copy of the policy that only the trainer updates
(`update_weights`, after every training step). Generation is batched with left-padded
prompts; each response stops at EOS (kept, like SGLang returns it) or a stop token, or
at the max response length. The log-probabilities the sampler saw are returned too, so
the trainer can measure (and, with use_tis, correct) the rollout/train mismatch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmsnake.trainer.policy import build_model, read_tokenizer
from glmsnake.trainer.rewards import get_reward
from glmsnake.trainer.settings import TrainerSettings


@dataclass
class Sample:
    """One response, as slime's Sample: tokens, the reward and where it came from."""

    group: int                 # index of the prompt in the rollout batch (GRPO's group)
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    response: str
    label: str
    reward: float = 0.0
    truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def sampling_seed(base: int, rollout_id: int, salt: int = 0) -> int:
    # One generator per rollout: a resumed run samples exactly what an uninterrupted one would.
    return (base * 1_000_003 + rollout_id * 7_919 + salt) % (2**63 - 1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, stop_ids: set[int],
           pad_id: int, generator: torch.Generator, device: torch.device) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Sample one response per prompt; returns (token ids, their log-probs, hit-the-length-limit)."""
    b, p = len(prompts), max(len(x) for x in prompts)
    ids = torch.full((b, p), pad_id, dtype=torch.long)
    mask = torch.zeros((b, p), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, p - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out: list[list[int]] = [[] for _ in range(b)]
    lps: list[list[float]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        if temperature > 0:
            logp = torch.log_softmax(logits / temperature, -1)
            nxt = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(device)
        else:
            logp = torch.log_softmax(logits, -1)
            nxt = logits.argmax(-1)
        chosen = logp.gather(1, nxt[:, None]).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(nxt[i]))
            lps[i].append(float(chosen[i]))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done |= torch.isin(nxt, stop)
        if bool(done.all()):
            break
    truncated = [not (r and r[-1] in stop_ids) for r in out]
    return out, lps, truncated


class RolloutWorker:
    """The rollout engine of the local backend (run as a Ray actor by the driver)."""

    def __init__(self, settings: TrainerSettings, device: str | None = None, threads: int = 1):
        torch.set_num_threads(threads)
        self.s = settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tok = read_tokenizer(Path(settings.hf_dir))
        import json

        self.hf_config = json.loads((Path(settings.hf_dir) / "config.json").read_text())
        self.model = build_model(self.hf_config).to(self.device).eval()
        self.weight_version = -1  # no weights until the trainer sends them
        self.reward = get_reward(settings.rm_type)
        self.stop_ids = {self.tok.eos_token_id, *settings.stop_token_ids}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> float:
        t0 = time.perf_counter()
        own = self.model.state_dict()
        self.model.load_state_dict({k: v.to(self.device, own[k].dtype) for k, v in state.items()}, strict=False)
        self.weight_version = version
        return time.perf_counter() - t0

    def encode(self, prompt: Any) -> list[int]:
        if self.s.rollout.apply_chat_template:
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return list(self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
        return list(self.tok(prompt, add_special_tokens=False).input_ids)

    def generate(self, rows: list[dict[str, Any]], n: int, max_len: int, temperature: float, seed: int,
                 chunk: int = 256) -> tuple[list[Sample], dict[str, float]]:
        """n samples for each row (consecutive, one group per row), rewarded."""
        if self.weight_version < 0:
            raise RuntimeError("rollout has no weights yet: the trainer must send them first")
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        flat = [(g, row) for g, row in enumerate(rows) for _ in range(n)]
        enc = {g: self.encode(row["prompt"]) for g, row in enumerate(rows)}
        samples: list[Sample] = []
        for start in range(0, len(flat), chunk):
            part = flat[start:start + chunk]
            resp, lps, trunc = sample(self.model, [enc[g] for g, _ in part], max_len, temperature,
                                      self.stop_ids, self.pad_id, gen, self.device)
            for (g, row), r, lp, t in zip(part, resp, lps, trunc):
                body = [x for x in r if x not in self.stop_ids]
                text = self.tok.decode(body, skip_special_tokens=True)
                samples.append(Sample(group=g, prompt_ids=enc[g], response_ids=r, rollout_logprobs=lp,
                                      response=text, label=str(row["label"]), truncated=t))
        for smp in samples:
            smp.reward = float(self.reward(smp.response, smp.label))
        seconds = time.perf_counter() - t0
        tokens = sum(len(x.response_ids) for x in samples)
        return samples, {"seconds": seconds, "tokens": tokens, "weight_version": self.weight_version}
