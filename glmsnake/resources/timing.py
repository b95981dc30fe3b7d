"""Conversion times, projected from our converters' measured throughputs: estimates, not promises.

- torch_dist (backend glmsnake): benchmarks/torch_dist_convert.py on the H200 host's 16 cores,
  8 GB GLM-shaped: one writer's work 14.0 s (0.57 GB/s), eight writers 4.2 s (1.9 GB/s a node);
  `cp -r` plus sync of the same folder reached 1.0-1.3 GB/s there, so storage caps a node at that.
- FP8 (CPU kernel): benchmarks/fp8_convert.py, 1 GB on 2 cores with 2 workers: 2.17 GB/s from page
  cache; about 1 GB/s a worker.
The file system of a real cluster decides more than either: the projection names its inputs.
"""

from __future__ import annotations

from glmsnake.resources.terms import Estimate

WRITER_GBPS = 0.57  # one torch_dist writer's own work
NODE_WRITER_CAP_GBPS = 1.9  # eight writers on one node
STORAGE_GBPS = 1.0  # cp -r + sync where the writers were measured
FP8_GBPS_PER_WORKER = 1.0


def conversion_times(wf, torch_dist_bytes: float, fp8_bytes_in: float) -> Estimate:
    """Seconds per conversion (as terms: `bytes` holds seconds)."""
    est = Estimate("conversion time (estimate)")
    td = wf.preset.convert.torch_dist
    if td.backend == "glmsnake":
        nodes = td.allocation.nodes
        rate = min(WRITER_GBPS * td.writers_per_node, NODE_WRITER_CAP_GBPS, STORAGE_GBPS)
        est.add("torch_dist", torch_dist_bytes / nodes / (rate * 1e9),
                f"{torch_dist_bytes / 1e9:.0f} GB over {nodes} node(s) at {rate:.2f} GB/s a node "
                f"(min of {td.writers_per_node} writers x {WRITER_GBPS}, {NODE_WRITER_CAP_GBPS} measured for 8, "
                f"storage {STORAGE_GBPS})")
    else:
        est.add("torch_dist", 0.0, "slime's converter: not measured here")
    workers = wf.preset.convert.fp8.workers
    est.add("FP8", fp8_bytes_in / (workers * FP8_GBPS_PER_WORKER * 1e9),
            f"{fp8_bytes_in / 1e9:.0f} GB read at {workers} workers x {FP8_GBPS_PER_WORKER} GB/s "
            "(CPU kernel; a GPU converts faster)")
    return est
