"""Test-only stand-in for slime's train.py: run by the launcher through the Ray Jobs SDK.

    python tests/cluster/ray_test_driver.py --nodes 8 --gpus 64 [--exit-code N] [--sleep S]

Connects to the cluster, checks it sees `--nodes` nodes and `--gpus` GPUs, places one actor
per GPU (num_gpus=1) and checks the actors ran on every node (each actor prints
`GLMSNAKE_PROBE ip=<its node>`, which Ray forwards to this driver's output); prints a JSON line
`GLMSNAKE_TEST_DRIVER {...}`; sleeps `--sleep` seconds (to kill a raylet meanwhile, or to let
the nodes' log monitors forward the actors' output, which is asynchronous), then exits with
`--exit-code`.
"""

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    a = ap.parse_args()

    import ray

    ray.init(address="auto")  # log_to_driver, as slime's train.py
    nodes = [n for n in ray.nodes() if n["Alive"]]
    gpus = ray.cluster_resources().get("GPU", 0)

    @ray.remote(num_gpus=1, num_cpus=0)
    class Probe:
        def where(self):
            print(f"GLMSNAKE_PROBE ip={ray.util.get_node_ip_address()}", flush=True)
            return ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

    t0 = time.time()
    actors = [Probe.remote() for _ in range(int(gpus))]
    placed = ray.get([x.where.remote() for x in actors], timeout=300)
    report = {
        "nodes": len(nodes),
        "gpus": gpus,
        "actors": len(placed),
        "actor_node_ids": sorted({nid for nid, _ in placed}),
        "node_ids": sorted(n["NodeID"] for n in nodes),
        "node_ips": sorted(n["NodeManagerAddress"] for n in nodes),
        "actors_s": round(time.time() - t0, 2),
        "env_no_proxy": os.environ.get("no_proxy", ""),
        "http_proxy": os.environ.get("http_proxy"),
    }
    print("GLMSNAKE_TEST_DRIVER " + json.dumps(report), flush=True)
    ok = report["nodes"] == a.nodes and gpus == a.gpus and len(set(report["actor_node_ids"])) == a.nodes
    for x in actors:
        ray.kill(x)
    if a.sleep:
        print(f"sleeping {a.sleep}s", flush=True)
        time.sleep(a.sleep)
    if not ok:
        print(f"expected {a.nodes} nodes / {a.gpus} GPUs with actors on every node", file=sys.stderr)
        return 97
    return a.exit_code


if __name__ == "__main__":
    sys.exit(main())
