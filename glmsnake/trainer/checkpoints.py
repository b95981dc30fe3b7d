"""Training checkpoints in Megatron's layout, written so that nothing is ever lost.

`<root>/iter_XXXXXXX/` holds the model (torch_dist, via the converter's `save_hf_state`)
and `glmsnake_trainer_state.pt` (fp32 master weights, Adam state, RNG states, the rollout
id to continue from): Megatron keeps the optimizer in the same folder. A checkpoint is
built in `<root>/.stage_iter_XXXXXXX/`, renamed into place when complete, and only then is
`latest_checkpointed_iteration.txt` replaced. The trainer deletes no checkpoint (a stage left
by a killed attempt is the only thing it removes: it was never complete); retention, outside the
trainer, prunes old ones by the run's `keep_checkpoints` (glmsnake/retention.py).

Iteration = the id of the last rollout trained, slime's convention (`save_model(rollout_id)`;
on load `start_rollout_id = iteration + 1`): resuming from `iter_0000007` continues with
rollout id 8, for both backends.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from glmsnake.atomic import fsync_dir, write_bytes
from glmsnake.convert.torch_dist import COMMON_NAME, TRACKER_NAME, iter_dir_name, save_hf_state
from glmsnake.convert.dcp_io import METADATA_NAME, damaged_files

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


def set_aside_damaged(root: Path) -> list[tuple[int, list[str], Path]]:
    """Before a resume: the newest checkpoints whose files are damaged move to `<root>/damaged/`
    (never deleted), newest first until an intact one, and the tracker names that one. A damaged
    checkpoint would fail every resume the same way; the run resumes from the one before instead.
    Works for slime's checkpoints too (the same torch_dist layout). Returns (iteration, problems,
    where it went)."""
    root = Path(root)
    moved = []
    for folder in sorted((p for p in root.glob("iter_*") if _ITER.match(p.name) and p.is_dir()), reverse=True):
        problems = damaged_files(folder)
        state = folder / TRAINER_STATE
        if state.is_file() and not zipfile.is_zipfile(state):  # torch.save's zip: its directory is at the end
            problems.append(f"{state}: truncated or not a torch checkpoint")
        if not problems:
            break
        dest = root / "damaged" / folder.name
        n = 1
        while dest.exists():
            n += 1
            dest = root / "damaged" / f"{folder.name}-{n}"
        dest.parent.mkdir(exist_ok=True)
        os.rename(folder, dest)
        moved.append((int(folder.name[5:]), problems, dest))
    if moved:
        remaining = sorted(int(p.name[5:]) for p in root.glob("iter_*") if _ITER.match(p.name))
        tracker = root / TRACKER_NAME
        if remaining:
            write_bytes(tracker, str(remaining[-1]).encode())
        else:
            tracker.unlink(missing_ok=True)
    return moved


def load_trainer_state(root: Path, iteration: int) -> dict[str, Any]:
    return torch.load(Path(root) / iter_dir_name(iteration) / TRAINER_STATE, map_location="cpu", weights_only=False)
