"""One small NCCL all-reduce across the nodes, one GPU each: the path the training's collectives take.

Run as a child process by each node's first task during preflight (`python nccl_probe.py HOST
PORT NODE_RANK NODES DEADLINE`, DEADLINE in seconds since the epoch; the standard library and torch
only), so the CUDA context and
NCCL's state die with it and the GPU is the step's again. It prints one JSON line: `ok`, the
sum it got and wanted, NCCL's version, seconds, or `error` with what failed (no CUDA for torch,
the store or NCCL's set-up). Node rank 0 hosts the TCPStore on HOST:PORT.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta


def probe(host: str, port: int, rank: int, world: int, deadline: float) -> dict:
    """`deadline`: wall-clock time (time.time()) by which to give up, so the import's seconds count."""
    t0 = time.monotonic()
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        return {"ok": False, "error": f"no torch in {sys.executable} ({e})", "local": True}
    if not torch.cuda.is_available():
        why = ""
        try:
            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 - the driver's own words are the finding
            why = f": {str(e).splitlines()[0][:300]}"
        return {"ok": False, "error": f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the GPUs{why}",
                "local": True}
    try:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)
    except Exception as e:  # noqa: BLE001 - a GPU torch sees but cannot use: this node's finding
        return {"ok": False, "error": f"torch cannot use GPU 0: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                "local": True}
    print(json.dumps({"ready": True}), flush=True)  # this node's own checks passed: now it waits for the others
    timeout = timedelta(seconds=max(1.0, deadline - time.time()))
    try:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which names the node
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    try:
        value = torch.full((1,), float(rank + 1), device=device)
        dist.all_reduce(value)
        torch.cuda.synchronize(device)
        total, want = value.item(), world * (world + 1) / 2
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"the all-reduce failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        dist.destroy_process_group()
    out = {"ok": total == want, "sum": total, "want": want, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
           "seconds": round(time.monotonic() - t0, 3)}
    if total != want:
        out["error"] = f"the all-reduce summed to {total}, {want} expected"
    return out


def main() -> None:
    host, port, rank, world, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    print(json.dumps(probe(host, port, rank, world, deadline)), flush=True)


if __name__ == "__main__":
    main()
