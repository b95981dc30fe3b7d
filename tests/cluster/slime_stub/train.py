"""Test-only stand-in for slime's train.py (never shipped): what the launcher really runs.

The slime-backend tests copy this file into a temporary `slime_dir`; the launcher submits
`python3 train.py --actor-num-nodes N ... <argument groups>` there through Ray's Jobs SDK.
It records argv, environment, cwd and the Ray cluster it sees in
`<--save>/../slime_stub_record.json` (and prints it as `GLMSNAKE_SLIME_STUB {...}`), then
"trains" like slime checkpoints: resumes after `--load`'s latest_checkpointed_iteration.txt
and saves `iter_XXXXXXX/` every `--save-interval` rollouts and at the last one (iteration =
rollout id), each folder complete before its atomic rename, the tracker replaced after it.
"""

import json
import os
import sys
import time
from pathlib import Path

ENV_KEYS = ("no_proxy", "NO_PROXY", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
            "MASTER_ADDR", "PYTHONPATH", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
            "CUDA_DEVICE_MAX_CONNECTIONS", "NVSHMEM_DISABLE_NCCL", "NCCL_NVLS_ENABLE", "RAY_ADDRESS",
            "WANDB_RUN_ID", "WANDB_RESUME", "TENSORBOARD_DIR")


def key_digest() -> str | None:
    """Which W&B key this process sees, as a digest: the record must never hold the key itself."""
    import hashlib

    key = os.environ.get("WANDB_API_KEY")
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


def flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def main() -> int:
    argv = sys.argv[1:]
    record = {"argv0": sys.argv[0], "argv": argv, "cwd": os.getcwd(), "pid": os.getpid(), "python": sys.executable,
              "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    import ray

    ray.init(address="auto", log_to_driver=False)
    alive = [n for n in ray.nodes() if n["Alive"]]
    record["ray"] = {"nodes": len(alive), "gpus": ray.cluster_resources().get("GPU", 0),
                     "node_ips": sorted(n["NodeManagerAddress"] for n in alive)}
    # slime's W&B secondaries run in Ray actors on every node: each must see the job's key.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(key_digest)
    seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                    for n in alive])
    record["wandb_key_digest"] = {"driver": key_digest(), "nodes": sorted(set(seen), key=str), "probed": len(seen)}
    save, load = Path(flag(argv, "--save")), Path(flag(argv, "--load"))
    interval, num_rollout = int(flag(argv, "--save-interval")), int(flag(argv, "--num-rollout"))
    tracker = load / "latest_checkpointed_iteration.txt"
    start = int(tracker.read_text()) + 1 if tracker.is_file() else 0
    record["start_rollout_id"] = start
    save.mkdir(parents=True, exist_ok=True)
    for rid in range(start, num_rollout):
        time.sleep(0.05)
        if (rid + 1) % interval == 0 or rid == num_rollout - 1:
            final = save / f"iter_{rid:07d}"
            stage = save / f".stage_iter_{rid:07d}"
            stage.mkdir(exist_ok=True)
            (stage / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
            (stage / "common.pt").write_bytes(b"stub")
            os.replace(stage, final)
            tmp = save / ".tracker.tmp"
            tmp.write_text(str(rid))
            os.replace(tmp, save / "latest_checkpointed_iteration.txt")
    (save.parent / "slime_stub_record.json").write_text(json.dumps(record))
    print("GLMSNAKE_SLIME_STUB " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
