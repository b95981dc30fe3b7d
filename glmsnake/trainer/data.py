"""Prompt data: jsonl rows with slime's input/label keys, the tiny preset's synthetic task,
and the rollout batches (a pure function of the rollout id, so a resumed run sees the
same prompts as an uninterrupted one)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# The tiny task: answer with the letter the prompt names. A tiny model can learn it
# by RL in minutes, and a reward on it is exact.
TINY_LETTERS = "abcdefgh"


def tiny_prompts(seed: int, n: int = 64) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letter = rng.choice(TINY_LETTERS)
        rows.append({"prompt": f"say {letter}:", "label": letter})
    return rows


def read_jsonl(path: Path, input_key: str, label_key: str) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if input_key not in row or label_key not in row:
                    raise KeyError(f"{path}:{i} lacks {input_key!r} or {label_key!r}")
                rows.append({"prompt": row[input_key], "label": row[label_key]})
    return rows


def rollout_batch(rows: list[dict[str, Any]], rollout_id: int, batch_size: int, shuffle: bool, seed: int) -> list[dict[str, Any]]:
    """The prompts of one rollout: consecutive slices of the data, epoch after epoch
    (each epoch in a fresh seeded order when shuffling, like slime's --rollout-shuffle)."""
    if not rows:
        raise ValueError("the prompt data is empty")
    out = []
    for i in range(rollout_id * batch_size, (rollout_id + 1) * batch_size):
        epoch, pos = divmod(i, len(rows))
        order = list(range(len(rows)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(rows[order[pos]])
    return out
