"""Prompt data: jsonl rows with slime's input/label keys, and the tiny preset's synthetic task."""

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
