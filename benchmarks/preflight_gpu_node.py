"""What preflight costs on one GPU node, beside the floor any CUDA process pays.

    python benchmarks/preflight_gpu_node.py [--repeat 3]

On a GPU node (real nvidia-smi): the node's own report (nvidia-smi queries, packages, sysfs,
free space), and the NCCL all-reduce (its child process: torch import, CUDA context, NCCL's
set-up, one all-reduce) on one node, side by side with a bare child process that imports torch
and makes a CUDA context, the floor of any GPU check. Across nodes NCCL's bootstrap adds the
network's round trips, which one node cannot show. Goal: preflight's addition to the time until
ready <= 3 s; the NCCL part runs on every node at once, so one node's time is the whole's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glmsnake.launch.preflight import PreflightSpec, nccl_allreduce, node_report  # noqa: E402

FLOOR = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    floor, report, nccl = [], [], []
    for _ in range(args.repeat):  # alternate, so a slow spell of the machine hits every measurement
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", FLOOR], check=True)
        floor.append(time.monotonic() - t0)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.monotonic()
            rep = node_report(PreflightSpec(gpus_per_node=1, nodes=1), Path(d), None)
            report.append(time.monotonic() - t0)
            if "smi_error" in rep:
                sys.exit(f"nvidia-smi failed: {rep['smi_error']}")
            t0 = time.monotonic()
            result = nccl_allreduce(Path(d), 0, 1, "127.0.0.1", time.monotonic() + 120)
            nccl.append(time.monotonic() - t0)
            if not result["ok"]:
                sys.exit(f"the NCCL all-reduce failed: {result}")
    med = statistics.median
    print(f"GPUs {rep.get('smi_gpus')} driver {rep.get('driver')} CUDA {rep.get('cuda')} NCCL {result.get('nccl')}")
    print(f"node report (nvidia-smi, packages, sysfs): median {med(report):.2f} s  ({', '.join(f'{x:.2f}' for x in report)})")
    print(f"NCCL all-reduce, one node:               median {med(nccl):.2f} s  ({', '.join(f'{x:.2f}' for x in nccl)})")
    print(f"floor: import torch + CUDA context:      median {med(floor):.2f} s  ({', '.join(f'{x:.2f}' for x in floor)})")
    print(f"NCCL probe / floor: {med(nccl) / med(floor):.2f}x; "
          f"report + NCCL: {med(report) + med(nccl):.2f} s against the 3 s goal")


if __name__ == "__main__":
    main()
