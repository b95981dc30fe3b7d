"""HF GLM-4-MoE <-> Megatron torch_dist, both directions (used by the convert_torch_dist and export_hf steps).

Writer (`backend: glmsnake`): CPU only, no model is built. The HF tensors are read by row
ranges straight into the Megatron tensors (qkv merged per query group, fc1 = cat(gate, up),
experts stacked), one tensor at a time, and appended to each writer rank's `.distcp`
file; the units (layers) are shared out between ranks by size. Rank 0 gathers every
rank's entries over gloo and writes the index `.metadata`, `common.pt` and
`metadata.json`. The release layout is staged in a temporary folder and renamed when
complete; the sentinel is written last.

Backend `slime`: slime's own converter (glmsnake.convert.slime_converter).

Reader: `load_hf_state` / `export_hf` turn any torch_dist checkpoint of this architecture
(ours, slime's, or Megatron's own training saves) back into HF tensors via torch's DCP
reader. `save_hf_state` is the trainer's writer for `iter_XXXXXXX/` checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from glmsnake.atomic import sha256_file, write_bytes, write_json
from glmsnake.publish import publish_dir, temp_dir_for
from glmsnake.convert import megatron_names as names
from glmsnake import architectures
from glmsnake.convert.dcp_io import (
    METADATA_NAME,
    DcpEntry,
    DcpReader,
    DistcpFile,
    HfReader,
    import_dcp,
    none_object_bytes,
    read_metadata,
    tensor_index,
    write_metadata,
)
from glmsnake.convert.safetensors_io import INDEX_NAME, SINGLE_NAME
from glmsnake.errors import GlmsnakeError
from glmsnake.paths import TRACKER

if TYPE_CHECKING:
    from glmsnake.recipe.args import ModelArgs

TRACKER_NAME = TRACKER
RELEASE = "release"
COMMON_NAME = "common.pt"
DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
CHECKPOINT_VERSION = 3.0  # Megatron's current state-dict version (set_checkpoint_version)


def iter_dir_name(iteration: int | None) -> str:
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


# --------------------------------------------------------------------------- planning


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise GlmsnakeError(f"{path} is missing", "download or generate the HF checkpoint first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class WritePlan:
    """Everything a writer rank needs; small and picklable (sent to every task)."""

    hf_dir: str
    arch: architectures.GlmArch
    layout: names.Layout = names.LOCAL

    def units(self) -> list[names.Unit]:
        return architectures.units(self.arch, self.layout)


def plan_conversion(hf_dir: Path, model_args: "ModelArgs | None", layout: names.Layout = names.LOCAL) -> WritePlan:
    """Check the HF checkpoint against the MODEL args and its own tensors; nothing is written."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    if model_args is not None:
        architectures.check_hf_config(cfg, model_args, str(hf_dir))
    arch = architectures.shape(cfg)
    with HfReader(hf_dir) as reader:
        architectures.check_hf_keys(arch, reader.keys(), str(hf_dir))
    return WritePlan(str(hf_dir), arch, layout)


def unit_bytes(unit: names.Unit, reader: HfReader) -> int:
    return sum(reader.nbytes(k) for k in unit.hf_keys)


def share_units(sizes: list[int], world: int) -> list[list[int]]:
    """Unit indices per rank: biggest first onto the least-loaded rank (ties: lowest rank)."""
    loads = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += sizes[i]
    return [sorted(s) for s in shares]


# --------------------------------------------------------------------------- writing


def write_share(plan: WritePlan, ckpt_dir: Path, rank: int, world: int) -> list[DcpEntry]:
    """Write this rank's units to `__<rank>_0.distcp`; returns its entries for the index."""
    obj = none_object_bytes()
    with HfReader(Path(plan.hf_dir)) as reader:
        units = plan.units()
        mine = [units[i] for i in share_units([unit_bytes(u, reader) for u in units], world)[rank]]
        layouts = [[(t, names.megatron_shape(t, reader.shape), reader.dtype(t.sources[0])) for t in u.tensors] for u in mine]
        # One buffer for every tensor, in turn: a fresh allocation per tensor costs a page fault per
        # 4 KiB, about a second per 8 GB. torch.frombuffer gives each tensor exactly its own bytes,
        # so torch.save stores no more than the tensor.
        scratch = memoryview(bytearray(max((_nbytes(s, d) for lay in layouts for _, s, d in lay), default=0)))
        out = DistcpFile(ckpt_dir, rank)
        try:
            if mine:
                reader.prefetch(mine[0].hf_keys)
            for n, (unit, layout) in enumerate(zip(mine, layouts)):
                if n + 1 < len(mine):
                    reader.prefetch(mine[n + 1].hf_keys)
                for t, shape, dtype in layout:
                    size = _nbytes(shape, dtype)
                    dest = torch.frombuffer(scratch[:size], dtype=dtype).view(shape) if size else torch.empty(shape, dtype=dtype)
                    names.fill(t, dest, reader.read_into, reader.shape)
                    out.add_tensor(t.key, dest)
                for key in unit.extra_states:
                    out.add_bytes(key, obj)
        finally:
            entries = out.close()
    return entries


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def finish_checkpoint(ckpt_dir: Path, entries: list[DcpEntry], iteration: int | None, provenance: dict[str, Any]) -> None:
    """The files besides the `.distcp` data: index, common state, backend config (this last)."""
    ckpt_dir = Path(ckpt_dir)
    write_metadata(ckpt_dir, entries)
    common = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration or 0, "glmsnake": provenance}
    torch.save(common, ckpt_dir / COMMON_NAME)
    write_json(ckpt_dir / "metadata.json", DIST_CONFIG)


class WriterTask:
    """One writer rank (picklable; any launcher): reads RANK/WORLD_SIZE/MASTER_* from the env.

    Rank 0 gathers the entries over gloo and writes the index. Returns a summary on rank 0.
    """

    needs = ("torch", "safetensors")  # from the task's Python (the image's, in a container)

    def __init__(self, plan: WritePlan, ckpt_dir: str, iteration: int | None = None, provenance: dict | None = None):
        self.plan, self.ckpt_dir, self.iteration = plan, ckpt_dir, iteration
        self.provenance = provenance or {}

    def __call__(self) -> dict[str, Any] | None:
        import torch.distributed as dist

        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        torch.set_num_threads(1)
        importing = threading.Thread(target=import_dcp, name="glmsnake-import-dcp", daemon=True)
        if rank == 0:  # the index writer: its DCP imports overlap its own writing (I/O, GIL released)
            importing.start()
        t0 = time.monotonic()
        entries = write_share(self.plan, Path(self.ckpt_dir), rank, world)
        wrote = time.monotonic() - t0
        if rank == 0:
            importing.join()  # an import that failed there fails again, with its traceback, in the index
        if world > 1:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
            try:
                gathered: list[Any] = [None] * world if rank == 0 else None  # type: ignore[assignment]
                dist.gather_object((entries, wrote), gathered, dst=0)
                if rank == 0:
                    self._finish([e for part, _ in gathered for e in part], [w for _, w in gathered])
                dist.barrier()  # nobody reports success before the index exists
            finally:
                dist.destroy_process_group()
        else:
            self._finish(entries, [wrote])
        return {"rank": rank, "world": world, "seconds": wrote, "items": len(entries)}

    def _finish(self, entries: list[DcpEntry], seconds: list[float]) -> None:
        finish_checkpoint(Path(self.ckpt_dir), entries, self.iteration,
                          {**self.provenance, "writers": len(seconds), "writer_seconds": seconds})


def run_writers_locally(task: WriterTask, world: int) -> None:
    """Run `world` writer ranks as processes on this machine (tests, benchmark, no Slurm)."""
    import multiprocessing as mp

    from glmsnake.launch.addresses import free_port

    if world == 1:
        env = {"RANK": "0", "WORLD_SIZE": "1"}
        _with_env(env, task)
        return
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    procs = []
    for r in range(world):
        env = {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        p = ctx.Process(target=_with_env, args=(env, task))
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise GlmsnakeError(f"writer ranks failed (rank, exit code): {bad}")


def _with_env(env: dict[str, str], fn) -> Any:
    os.environ.update(env)
    return fn()


def convert(hf_dir: Path, out_root: Path, model_args: "ModelArgs | None" = None, *, writers: int = 1,
            provenance: dict | None = None, layout: names.Layout = names.LOCAL) -> Path:
    """HF folder -> torch_dist release checkpoint at `out_root`, with local processes (no Slurm).

    Staged in a temporary folder and renamed; returns the release folder.
    """
    plan = plan_conversion(hf_dir, model_args, layout)
    out_root = Path(out_root)
    stage = fresh_stage(out_root)
    run_writers_locally(WriterTask(plan, str(stage / RELEASE), None, provenance), writers)
    write_bytes(stage / TRACKER_NAME, RELEASE.encode())
    publish_dir(stage, out_root)
    return out_root / RELEASE


def fresh_stage(final: Path) -> Path:
    # A partial folder from a failed attempt holds half-written .distcp files: start over.
    stage = temp_dir_for(final)
    shutil.rmtree(stage, ignore_errors=True)
    (stage / RELEASE).mkdir(parents=True)
    return stage


# --------------------------------------------------------------------------- checkpoints in HF names (trainer)


def find_checkpoint(path: Path) -> Path:
    """An `iter_*`/`release` folder, or the latest one of a checkpoint root (tracker file)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER_NAME
    if not tracker.is_file():
        raise GlmsnakeError(f"{path} is neither a torch_dist checkpoint folder nor a root with {TRACKER_NAME}",
                            "point at a Megatron checkpoint root or its iter_XXXXXXX/release folder")
    text = tracker.read_text().strip()
    sub = path / (RELEASE if text == RELEASE else iter_dir_name(int(text)))
    if not (sub / "metadata.json").is_file():
        raise GlmsnakeError(f"{tracker} names {sub.name}, which is missing or incomplete")
    return sub


def save_hf_state(state: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any] | Any, out_root: Path,
                  iteration: int | None, layout: names.Layout = names.LOCAL) -> Path:
    """Save HF-named tensors as a Megatron torch_dist checkpoint `out_root/iter_XXXXXXX` (None: release).

    The iteration folder is staged and renamed, then the tracker file is replaced: a crash
    leaves the previous checkpoint as the latest one.
    """
    arch = architectures.shape(hf_config)
    architectures.check_hf_keys(arch, state.keys(), "save_hf_state")
    out_root = Path(out_root)
    final = out_root / iter_dir_name(iteration)
    stage = temp_dir_for(final)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    out = DistcpFile(stage, 0)
    obj = none_object_bytes()
    cpu = {k: v.detach().to("cpu") for k, v in state.items()}
    try:
        for unit in architectures.units(arch, layout):
            for t in unit.tensors:
                out.add_tensor(t.key, names.to_megatron(t, cpu))
            for key in unit.extra_states:
                out.add_bytes(key, obj)
    finally:
        entries = out.close()
    finish_checkpoint(stage, entries, iteration, {"writer": "save_hf_state"})
    publish_dir(stage, final)
    write_bytes(out_root / TRACKER_NAME, (RELEASE if iteration is None else str(iteration)).encode())
    return final


def load_hf_state(ckpt: Path, hf_config: Mapping[str, Any] | Any,
                  dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a torch_dist checkpoint (root or iteration folder, any key layout) in HF names."""
    arch = architectures.shape(hf_config)
    reader = DcpReader(find_checkpoint(ckpt))
    out: dict[str, torch.Tensor] = {}
    for unit in architectures.units(arch, architectures.detect_layout(arch, reader.index)):
        out.update(_unit_to_hf(unit, reader, arch, dtypes))
    return out


def _unit_to_hf(unit: names.Unit, reader: DcpReader, arch: architectures.GlmArch,
                dtypes: Mapping[str, torch.dtype] | None) -> dict[str, torch.Tensor]:
    loaded = reader.load([t.key for t in unit.tensors])
    out: dict[str, torch.Tensor] = {}
    for t in unit.tensors:
        for k, v in names.split(t, loaded.pop(t.key), arch).items():
            want = (dtypes or {}).get(k)
            out[k] = v if want is None or v.dtype == want else v.to(want)
    return out


# --------------------------------------------------------------------------- export (torch_dist -> HF folder)

_WEIGHT_FILES = (".safetensors", INDEX_NAME)


def export_hf(ckpt: Path, reference_hf: Path, out_dir: Path) -> dict[str, Any]:
    """Write the checkpoint as an HF folder in `out_dir` (a staging folder), shaped like `reference_hf`.

    Streams unit by unit; tensors go to the reference's shard files (one file is written as
    soon as all its tensors are there), in the reference's dtypes. Non-weight files
    (config, tokenizer, generation config) are copied from the reference.
    """
    reference_hf, out_dir = Path(reference_hf), Path(out_dir)
    from safetensors.torch import save_file

    arch = architectures.shape(read_hf_config(reference_hf))
    reader = DcpReader(find_checkpoint(ckpt))
    layout = architectures.detect_layout(arch, reader.index)  # slime's (Transformer Engine) keys, ours, or per-expert
    with HfReader(reference_hf) as ref:
        ref_keys, dtypes = ref.keys(), {k: ref.dtype(k) for k in ref.keys()}
    architectures.check_hf_keys(arch, ref_keys, str(reference_hf))
    index_path = reference_hf / INDEX_NAME
    plan = json.loads(index_path.read_text())["weight_map"] if index_path.is_file() else {k: SINGLE_NAME for k in ref_keys}
    remaining: dict[str, set[str]] = {}
    for k, f in plan.items():
        remaining.setdefault(f, set()).add(k)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    shared = {f"model.layers.{arch.num_layers + j}.{s}": src
              for j in range(arch.mtp_layers)
              for s, src in zip(names.MTP_SHARED_SUFFIXES, ("model.embed_tokens.weight", "lm_head.weight"))}
    shared = {k: v for k, v in shared.items() if k in plan}
    total = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for unit in architectures.units(arch, layout):
        tensors = _unit_to_hf(unit, reader, arch, dtypes)
        for dst, src in shared.items():
            if src in tensors:
                tensors[dst] = tensors[src].clone()
        for k, v in tensors.items():
            f = plan[k]
            pending.setdefault(f, {})[k] = v
            remaining[f].discard(k)
            if not remaining[f]:
                save_file(pending.pop(f), out_dir / f, metadata={"format": "pt"})
                total += (out_dir / f).stat().st_size
    if pending:
        raise GlmsnakeError(f"export: tensors never produced for {sorted(remaining)}")
    write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(plan.items()))})
    for p in sorted(reference_hf.iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_FILES) and not p.name.startswith("glmsnake."):
            shutil.copy2(p, out_dir / p.name)
    return {"files": sorted(set(plan.values())), "tensors": len(plan), "layout": layout.describe()}


# --------------------------------------------------------------------------- checks of a written checkpoint


def describe_checkpoint(ckpt_dir: Path, hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Key set, shapes, dtypes, key layout and the index checksum: what the sentinel records."""
    md = read_metadata(ckpt_dir)
    tensors = {k: {"shape": list(s), "dtype": str(d).removeprefix("torch.")} for k, (s, d) in sorted(tensor_index(md).items())}
    objects = sorted(k for k, v in md.state_dict_metadata.items() if k not in tensors)
    import hashlib

    return {
        "tensors": tensors,
        "objects": {"count": len(objects), "sha256": hashlib.sha256("\n".join(objects).encode()).hexdigest()},
        "metadata_sha256": sha256_file(Path(ckpt_dir) / METADATA_NAME),
        "layout": architectures.detect_layout(architectures.shape(hf_config), tensors).describe(),
        "files": sorted(p.name for p in Path(ckpt_dir).iterdir()),
    }


def verify_release(root: Path) -> Path:
    """The published layout exists: tracker says release, release/ has metadata.json, .metadata, common.pt."""
    tracker = root / TRACKER_NAME
    if not tracker.is_file() or tracker.read_text().strip() != RELEASE:
        raise GlmsnakeError(f"{root} has no {TRACKER_NAME} saying '{RELEASE}'", "the converter did not finish")
    rel = root / RELEASE
    for name in ("metadata.json", METADATA_NAME, COMMON_NAME):
        if not (rel / name).is_file():
            raise GlmsnakeError(f"{rel / name} is missing", "the converter did not finish")
    if json.loads((rel / "metadata.json").read_text()).get("sharded_backend") != "torch_dist":
        raise GlmsnakeError(f"{rel / 'metadata.json'} is not a torch_dist checkpoint config")
    return rel
