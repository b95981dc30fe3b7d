"""Training checkpoints in Megatron's layout, written so that nothing is ever lost.

`<root>/iter_XXXXXXX/` holds the model (torch_dist, via the converter's `save_hf_state`)
and `glmsnake_trainer_state.pt` (fp32 master weights, Adam state, RNG states, the rollout
id to continue from): Megatron keeps the optimizer in the same folder. A checkpoint is
built in `<root>/.stage_iter_XXXXXXX/`, renamed into place when complete, and only then is
`latest_checkpointed_iteration.txt` replaced. Checkpoints are never deleted; a stage left by
a killed attempt is the only thing removed (it was never complete).

Iteration = the id of the last rollout trained, slime's convention (`save_model(rollout_id)`;
on load `start_rollout_id = iteration + 1`): resuming from `iter_0000007` continues with
rollout id 8, for both backends.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from glmsnake.atomic import fsync_dir, write_bytes
from glmsnake.convert.torch_dist import COMMON_NAME, TRACKER_NAME, iter_dir_name, save_hf_state
from glmsnake.convert.dcp_io import METADATA_NAME

TRAINER_STATE = "glmsnake_trainer_state.pt"
_ITER = re.compile(r"^iter_(\d{7})$")


def is_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("metadata.json", METADATA_NAME, COMMON_NAME, TRAINER_STATE))


def iterations(root: Path) -> list[int]:
    """Complete checkpoints under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _ITER.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append(int(m.group(1)))
    return sorted(found)


def latest(root: Path) -> int | None:
    """The newest complete checkpoint (the tracker is repaired if a crash left it behind)."""
    its = iterations(root)
    if not its:
        return None
    tracker = Path(root) / TRACKER_NAME
    if not tracker.is_file() or tracker.read_text().strip() != str(its[-1]):
        write_bytes(tracker, str(its[-1]).encode())
    return its[-1]


def save(root: Path, iteration: int, hf_state: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any],
         trainer_state: Mapping[str, Any]) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / iter_dir_name(iteration)
    if final.exists():
        # Never replace a checkpoint: a complete one is what a later resume may need.
        if is_complete(final):
            return final
        raise RuntimeError(f"{final} exists but is incomplete; it was not written by this trainer")
    stage_root = root / f".stage_{iter_dir_name(iteration)}"
    shutil.rmtree(stage_root, ignore_errors=True)
    staged = save_hf_state(hf_state, hf_config, stage_root, iteration)
    buf = io.BytesIO()
    torch.save(dict(trainer_state), buf)
    write_bytes(staged / TRAINER_STATE, buf.getvalue())
    os.rename(staged, final)          # the moment the checkpoint exists
    fsync_dir(root)
    write_bytes(root / TRACKER_NAME, str(iteration).encode())
    shutil.rmtree(stage_root, ignore_errors=True)
    return final


def load_trainer_state(root: Path, iteration: int) -> dict[str, Any]:
    return torch.load(Path(root) / iter_dir_name(iteration) / TRAINER_STATE, map_location="cpu", weights_only=False)
