"""Benchmark: HF -> torch_dist conversion on this CPU against `cp -r` of the same folder.

Writes a synthetic GLM-4-MoE-shaped checkpoint (bf16, fp32 expert bias, one dense layer,
MoE layers with routed + shared experts, one MTP layer; one shard per layer) of about
--gb gigabytes, then measures in the same run:
- `cp -r` of the HF folder plus `sync`, and N concurrent `cp` of its shards plus `sync` (the
  disk's pace for N streams);
- the conversion with each --writers count, each in a fresh process as a launcher starts it
  (the writers fsync): the whole process, the conversion itself (convert() through sync), and the
  writers' own work (each rank's write_share: read, lay out, write, fsync);
- each conversion's peak RSS (largest writer) against the largest layer.
The verdict lines compare 1 writer's conversion with `cp -r`, and N writers' work with 1 writer's
(scaling) and with N concurrent `cp` (the disk's limit).

    python benchmarks/torch_dist_convert.py --gb 2.5 --dir /tmp/tdbench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()  # this process's start, before torch and glmsnake are imported
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def glm_shape(gb: float) -> dict:
    """A GLM-4.7-like config (narrower) with enough MoE layers for about `gb` GB of bf16."""
    h, experts, moe_ffn, vocab = 2048, 64, 768, 32768
    moe_layer = 2 * (experts * 3 * moe_ffn * h + 3 * moe_ffn * h + 4 * h * h)
    fixed = 2 * (2 * vocab * h + 3 * 6144 * h + 4 * h * h)
    layers = max(2, round((gb * 1e9 - fixed) / moe_layer))  # MoE layers: layers - 1, plus the MTP layer
    return {
        "model_type": "glm4_moe", "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": moe_ffn,
        "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "vocab_size": vocab, "attention_bias": True, "use_qk_norm": True, "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-5, "routed_scaling_factor": 2.5,
    }


def synthetic_checkpoint(out: Path, cfg: dict) -> dict[str, int]:
    """Write shards (one per layer) with random values; returns bytes per HF layer."""
    import torch
    from safetensors.torch import save_file

    from glmsnake import architectures

    arch = architectures.shape(cfg)
    h, d = cfg["hidden_size"], cfg["head_dim"]
    shapes = {
        "self_attn.q_proj.weight": (cfg["num_attention_heads"] * d, h), "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * d, h),
        "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * d, h), "self_attn.q_proj.bias": (cfg["num_attention_heads"] * d,),
        "self_attn.k_proj.bias": (cfg["num_key_value_heads"] * d,), "self_attn.v_proj.bias": (cfg["num_key_value_heads"] * d,),
        "self_attn.o_proj.weight": (h, cfg["num_attention_heads"] * d), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (cfg["intermediate_size"], h), "mlp.up_proj.weight": (cfg["intermediate_size"], h),
        "mlp.down_proj.weight": (h, cfg["intermediate_size"]), "mlp.gate.weight": (cfg["n_routed_experts"], h),
        "mlp.gate.e_score_correction_bias": (cfg["n_routed_experts"],), "eh_proj.weight": (h, 2 * h),
        "enorm.weight": (h,), "hnorm.weight": (h,), "shared_head.norm.weight": (h,),
        "embed_tokens.weight": (cfg["vocab_size"], h), "norm.weight": (h,), "lm_head.weight": (cfg["vocab_size"], h),
    }
    m = cfg["moe_intermediate_size"]

    def shape(key: str) -> tuple:
        tail = key.split(".", 3)[-1] if key.startswith("model.layers.") else key.removeprefix("model.")
        if ".experts." in key or ".shared_experts." in key:
            return (h, m) if key.endswith("down_proj.weight") else (m, h)
        return shapes[tail]

    out.mkdir(parents=True, exist_ok=True)
    weight_map, per_layer = {}, {}
    gen = torch.Generator().manual_seed(0)
    for u in architectures.units(arch):
        keys = u.hf_keys
        tensors = {}
        for k in keys:
            dtype = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
            tensors[k] = (torch.rand(shape(k), generator=gen, dtype=torch.float32) - 0.5).to(dtype)
        fname = f"model-{len(per_layer) + 1:05d}.safetensors"
        save_file(tensors, out / fname, metadata={"format": "pt"})
        per_layer[u.name] = sum(t.nbytes for t in tensors.values())
        weight_map.update({k: fname for k in keys})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    return per_layer


def timed(cmd: list[str]) -> tuple[float, int, dict]:
    """Wall seconds of a conversion process, the peak RSS (bytes) and the timings it reports as JSON
    on its last stdout line."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("# "):
            print(line[2:], flush=True)
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall, inner.pop("peak_rss"), inner


def parallel_cp_seconds(src: Path, dest: Path, streams: int) -> float:
    """Wall seconds of `streams` concurrent `cp` processes (the shards dealt out by size) plus sync."""
    files = sorted(src.iterdir(), key=lambda f: -f.stat().st_size)
    dest.mkdir(parents=True)
    groups = [files[i::streams] for i in range(streams)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["cp", *map(str, g), str(dest)]) for g in groups if g]
    if any([p.wait() for p in procs]):  # a list: wait for every cp, then judge
        sys.exit("parallel cp failed")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


class RankStats:
    """A writer rank that leaves its peak RSS in FOLDER/rank<r>.rss and, with `profile`, its cProfile
    stats in FOLDER/rank<r>.prof. Writers are forked by a fork server, not by this process, so
    RUSAGE_CHILDREN here would not see them. Picklable."""

    def __init__(self, task, folder: str, profile: bool):
        self.task, self.folder, self.profile = task, folder, profile

    def __call__(self):
        import cProfile
        import os

        rank = os.environ.get("RANK", "0")
        prof = cProfile.Profile() if self.profile else None
        try:
            return prof.runcall(self.task) if prof else self.task()
        finally:
            if prof:
                prof.dump_stats(f"{self.folder}/rank{rank}.prof")
            Path(f"{self.folder}/rank{rank}.rss").write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def convert_main(hf: str, out: str, writers: int, profile: str | None = None) -> None:
    import tempfile

    from glmsnake.convert import torch_dist

    stats = profile or tempfile.mkdtemp(prefix="tdbench-rss")
    real = torch_dist.run_writers_locally
    torch_dist.run_writers_locally = lambda task, world: real(RankStats(task, stats, bool(profile)), world)
    t0 = time.perf_counter()
    torch_dist.convert(Path(hf), Path(out), None, writers=writers)
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    t2 = time.perf_counter()
    import torch

    common = torch.load(Path(out) / "release" / "common.pt", weights_only=False)
    seconds = common["glmsnake"]["writer_seconds"]
    print(f"# convert() {t1 - t0:.2f} s, sync {t2 - t1:.2f} s, process start to convert() {t0 - START:.2f} s; "
          f"each rank's write_share: {[round(x, 2) for x in seconds]}", file=sys.stderr)
    # Largest process: a writer rank (ru_maxrss is per process, in KiB).
    peak = max((int(f.read_text()) for f in Path(stats).glob("rank*.rss")), default=0)
    if not profile:
        shutil.rmtree(stats, ignore_errors=True)
    print(json.dumps({"peak_rss": peak * 1024, "start_s": t0 - START, "convert_s": t2 - t0, "work_s": max(seconds)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=2.5)
    p.add_argument("--dir", default="/tmp/tdbench")
    p.add_argument("--writers", default="1,2")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every measurement; verdicts take medians")
    p.add_argument("--profile", help="profile each writer rank of the last --writers count into this folder")
    p.add_argument("--writeback-mb", default="256", help="GLMSNAKE_WRITEBACK_MB values to compare, e.g. 0,256")
    p.add_argument("--_convert", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._convert:
        convert_main(a._convert[0], a._convert[1], int(a._convert[2]), *a._convert[3:])
        return
    if a._make:
        print(json.dumps(synthetic_checkpoint(Path(a._make[0]), glm_shape(float(a._make[1])))))
        return
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    hf = base / "hf"
    t0 = time.perf_counter()
    # In a child: Linux keeps a process's peak RSS across fork+exec, so this process stays small
    # and the conversions' peak RSS below is their own.
    made = subprocess.run([sys.executable, __file__, "--_make", str(hf), str(a.gb)], check=True, capture_output=True, text=True)
    per_layer = json.loads(made.stdout.strip().splitlines()[-1])
    total = sum(per_layer.values())
    largest = max(per_layer.values())
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB, {len(per_layer)} units, largest layer {largest / 1e9:.2f} GB "
          f"(made in {time.perf_counter() - t0:.1f} s)", flush=True)
    subprocess.run(["sync"], check=True)
    counts = list(map(int, a.writers.split(",")))
    # Rounds alternate every measurement, so a disk whose pace drifts (shared, throttled) meets all
    # of them alike; the verdicts below take each one's median.
    runs: dict[str, list] = {}
    for rnd in range(1, a.repeat + 1):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", f"cp -r {hf} {base / 'hf_copy'} && sync"], check=True)
        runs.setdefault("cp", []).append(time.perf_counter() - t0)
        shutil.rmtree(base / "hf_copy")
        print(f"[round {rnd}] cp -r + sync: {runs['cp'][-1]:.2f} s ({total / runs['cp'][-1] / 1e9:.2f} GB/s)", flush=True)
        # The disk's pace for N streams: N `cp` processes, each copying its share of the shards, then sync.
        for w in counts[1:]:
            runs.setdefault(f"cp{w}", []).append(parallel_cp_seconds(hf, base / "hf_copies", w))
            shutil.rmtree(base / "hf_copies")
            print(f"[round {rnd}] {w} parallel cp + sync: {runs[f'cp{w}'][-1]:.2f} s", flush=True)
        for mb in a.writeback_mb.split(","):
            os.environ["GLMSNAKE_WRITEBACK_MB"] = mb
            for w in counts:
                out = base / f"td_w{w}"
                extra = [a.profile] if a.profile and w == counts[-1] else []
                wall, rss, inner = timed([sys.executable, __file__, "--_convert", str(hf), str(out), str(w), *extra])
                runs.setdefault(f"w{w}" + ("" if mb == "256" else f"_wb{mb}"), []).append({"seconds": wall, "peak_rss": rss, **inner})
                print(f"[round {rnd}] convert, {w} writer(s), writeback every {mb} MB: the whole process {wall:.2f} s, "
                      f"conversion {inner['convert_s']:.2f} s = {inner['convert_s'] / runs['cp'][-1]:.2f} x this round's cp; "
                      f"peak RSS {rss / 1e9:.2f} GB = {rss / largest:.2f} x largest layer", flush=True)
                shutil.rmtree(out)
    results = {k: statistics.median(v) if not isinstance(v[0], dict) else {f: statistics.median(r[f] for r in v) for f in v[0]}
               for k, v in runs.items()}
    cp_s = results["cp"]
    print(f"medians of {a.repeat} round(s): cp -r + sync {cp_s:.2f} s ({total / cp_s / 1e9:.2f} GB/s)")
    if "w1" in results:
        print(f"1 writer's conversion: {results['w1']['convert_s'] / cp_s:.2f}x cp+sync "
              f"(process start, imports, before it: {results['w1']['start_s']:.2f} s)")
        for w in counts[1:]:
            r = results[f"w{w}"]
            up = results["w1"]["work_s"] / r["work_s"]
            print(f"{w} writers: their work {r['work_s']:.2f} s (slowest rank) = {up:.2f}x speed-up over 1 writer's "
                  f"({up / w:.0%} of linear), {r['work_s'] / results[f'cp{w}']:.2f}x {w} parallel cp+sync (the disk's pace); "
                  f"conversion {r['convert_s']:.2f} s, of which starting the writer processes and gathering the index "
                  f"{r['convert_s'] - r['work_s']:.2f} s")
    print(json.dumps({"total_bytes": total, "largest_layer_bytes": largest, **results}))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
