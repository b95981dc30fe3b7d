"""Make the GPU check's inputs on a CPU machine: the tiny HF checkpoint and its torch_dist
conversions by 1, 2 and 4 writer ranks (glmsnake's real writer, real gloo processes).

    python tests/gpu/make_inputs.py OUT_DIR [PRESET]   # -> OUT_DIR/hf, OUT_DIR/td_w1, td_w2, td_w4
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

WRITERS = (1, 2, 4)


def make_inputs(out: Path, writers=WRITERS, seed: int = 0, preset: str = "tiny") -> dict[str, Path]:
    from glmsnake import resolve
    from glmsnake.convert import torch_dist
    from glmsnake.convert.tiny import make_tiny

    model = resolve.load({"preset": preset}).preset.model
    hf = out / "hf"
    if not (hf / "config.json").is_file():
        make_tiny(hf, model, seed=seed)
    made = {"hf": hf}
    for w in writers:
        made[f"w{w}"] = out / f"td_w{w}"
        torch_dist.convert(hf, made[f"w{w}"], model, writers=w)
    return made


if __name__ == "__main__":
    for name, path in make_inputs(Path(sys.argv[1]), preset=sys.argv[2] if len(sys.argv) > 2 else "tiny").items():
        print(name, path)
