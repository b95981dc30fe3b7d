"""One small NCCL all-reduce across the nodes, one GPU each: the path the training's collectives take.

Run as a child process by each node's first task during preflight (`python nccl_probe.py HOST
PORT NODE_RANK NODES TIMEOUT_S`: the standard library and torch only), so the CUDA context and
NCCL's state die with it and the GPU is the step's again. It prints one JSON line: `ok`, the
sum it got and wanted, NCCL's version, seconds, or `error` with what failed (no CUDA for torch,
the store or NCCL's set-up). Node rank 0 hosts the TCPStore on HOST:PORT.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta


def probe(host: str, port: int, rank: int, world: int, timeout_s: float) -> dict:
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
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    try:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device,
                                timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which names the node
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    try:
        value = torch.full((1,), float(rank + 1), device=device)
        dist.all_reduce(value)
        torch.cuda.synchronize(device)
        total, want = value.item(), world * (world + 1) / 2
    finally:
        dist.destroy_process_group()
    return {"ok": total == want, "sum": total, "want": want, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "seconds": round(time.monotonic() - t0, 3)}


def main() -> None:
    host, port, rank, world, timeout_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    print(json.dumps(probe(host, port, rank, world, timeout_s)), flush=True)


if __name__ == "__main__":
    main()
