"""FP8 conversion: glmsnake's streaming converter against a straightforward per-file baseline.

    python benchmarks/fp8_convert.py --gb 2 --workers 2 --device cpu
    python benchmarks/fp8_convert.py --gb 8 --workers 8 --device cuda --cross-check

Both convert the same synthetic GLM-4.7-shaped shards (attention 12288x5120, expert
projections 1536x5120 and 5120x1536, norms, router, expert bias), each in its own
subprocess so peak RSS is measured separately (ru_maxrss of that process). The
baseline does what slime's public tool does: load a whole shard, run whole-tensor
float32 torch ops, save_file. Outputs must be byte-identical. The plain file-read
bandwidth of the same files (one sequential pass, page cache warm, as for both
converters) is measured in the same run as the ceiling.

On a CPU glmsnake uses its C kernel (fp8_kernel), compiled once per machine and
cached: the run reports that one-time build separately; each timed run includes
loading and self-checking the cached library. Per-phase seconds are summed over threads; the
"wall" figures are setup, the hashing left after the last conversion task
(one shard's sha256, which cannot start before the shard is complete) and finish.
On a shared machine prefer --repeat and the CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmsnake import publish
from glmsnake.architectures import ARCHITECTURES
from glmsnake.convert import fp8, fp8_kernel, fp8_shard

HIDDEN, Q_OUT, MOE_FFN = 5120, 12288, 1536
SHARD_BYTES = 512 << 20


# ---------------------------------------------------------------- synthetic input


def synthetic_shard(layer: int, gen: torch.Generator, budget: int) -> dict[str, torch.Tensor]:
    """One shard: a layer's attention q_proj plus experts up to the byte budget."""
    p = f"model.layers.{layer}."

    def w(rows, cols):
        return (torch.randn(rows, cols, generator=gen, device=gen.device) * 0.02).to(torch.bfloat16).cpu()

    t = {
        p + "self_attn.q_proj.weight": w(Q_OUT, HIDDEN),
        p + "self_attn.q_proj.bias": w(1, Q_OUT).view(-1),
        p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        p + "mlp.gate.weight": w(160, HIDDEN),
        p + "mlp.gate.e_score_correction_bias": torch.randn(160, generator=gen, device=gen.device).cpu(),
    }
    used = sum(x.numel() * x.element_size() for x in t.values())
    e = 0
    while used < budget:
        for name, shape in (
            ("gate_proj", (MOE_FFN, HIDDEN)),
            ("up_proj", (MOE_FFN, HIDDEN)),
            ("down_proj", (HIDDEN, MOE_FFN)),
        ):
            t[f"{p}mlp.experts.{e}.{name}.weight"] = w(*shape)
        used += 3 * MOE_FFN * HIDDEN * 2
        e += 1
    return t


def make_input(dir: Path, gb: float, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    marker = dir / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("gb") == gb:
        return dir
    shutil.rmtree(dir, ignore_errors=True)
    dir.mkdir(parents=True)
    # On a GPU machine the GPU draws the numbers (minutes less of device time); same bytes each run.
    gen = torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    total, n = int(gb * 1e9), max(1, round(gb * 1e9 / SHARD_BYTES))
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shard = synthetic_shard(i, gen, total // n)
        save_file(shard, dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        del shard
    (dir / fp8.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dir / "config.json").write_text(json.dumps({"model_type": "glm4_moe", "hidden_size": HIDDEN}))
    marker.write_text(json.dumps({"gb": gb}))
    return dir


def shard_files(dir: Path) -> list[Path]:
    return sorted(dir.glob("*.safetensors"))


def read_bandwidth(dir: Path) -> tuple[float, int]:
    """Seconds and bytes of one plain sequential read of every shard (what a copy must at least do)."""
    buf = bytearray(16 << 20)
    total, t0 = 0, time.perf_counter()
    for p in shard_files(dir):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


# ---------------------------------------------------------------- the baseline


def baseline_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-tensor block FP8, the public tool's way: pad, reshape, float32 ops, crop."""
    rows, cols = w.shape
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    padded = F.pad(w, (0, nc * block[1] - cols, 0, nr * block[0] - rows))
    blocks = padded.reshape(nr, block[0], nc, block[1])
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    # a tensor divisor: CUDA turns division by a Python number into a reciprocal multiply
    scale = amax.clamp(min=1e-12).to(torch.float32) / torch.tensor(448.0, device=w.device)
    q = (blocks.to(torch.float32) / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    q = q.reshape(nr * block[0], nc * block[1])[:rows, :cols].clone()
    return q, scale.reshape(nr, nc)


def baseline_convert(src: Path, dst: Path, workers: int, device: str, block=(128, 128)) -> None:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)

    def one(path: Path) -> None:
        tensors = load_file(path, device=device)  # the whole shard
        out = {}
        for k, w in tensors.items():
            if ARCHITECTURES["glm4_moe"].quantized_weight.search(k) and w.dim() == 2:
                q, s = baseline_quantize(w, block)
                out[k], out[k.removesuffix("weight") + "weight_scale_inv"] = q.cpu(), s.cpu()
            else:
                out[k] = w.cpu()
        save_file(out, dst / path.name, metadata={"format": "pt"})

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, shard_files(src)))


# ---------------------------------------------------------------- one measured run per subprocess


def child(impl: str, src: Path, dst: Path, workers: int, device: str, fsync: bool, cuda_chunk: int | None) -> None:
    if cuda_chunk:
        fp8_shard.CHUNK_ELEMENTS["cuda"] = cuda_chunk
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(publish.temp_dir_for(dst), ignore_errors=True)
    torch.ones(1).sum()  # load torch's kernels before timing
    if device == "cuda":  # and create the CUDA context (~0.5 s), for both implementations alike
        torch.ones(1, device="cuda").sum().item()
    # One torch thread per worker when the workers fill the cores, for both implementations.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    t0, cpu0, phases = time.perf_counter(), os.times(), {}
    if impl == "baseline":
        baseline_convert(src, dst, workers, device)
    else:
        with open(os.devnull, "w") as quiet:
            result = fp8.convert(src, dst, workers=workers, device=device, fsync=fsync, log=quiet)
        phases = result.phase_seconds
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu1 = time.perf_counter() - t0, os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)  # all threads; on a shared machine, the fair unit
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "maxrss_kb": peak_rss_kb(), "phases": phases}))


def peak_rss_kb() -> int:
    """This process's peak RSS. Not ru_maxrss: after fork+exec that also counts the parent's RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(impl: str, src: Path, dst: Path, args, workers: int | None = None, cuda_chunk=None, fatal=True):
    cmd = [sys.executable, __file__, "--child", impl, "--src", str(src), "--dst", str(dst),
           "--workers", str(workers or args.workers), "--device", args.device]  # fmt: skip
    if args.fsync:
        cmd.append("--fsync")
    if cuda_chunk or args.cuda_chunk:
        cmd += ["--cuda-chunk", str(cuda_chunk or args.cuda_chunk)]
    os.sync()  # flush earlier writes (the input, the last run's output) so no run pays for another's
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode:
        if fatal:
            sys.exit(f"{impl} failed:\n{out.stderr}")
        print(f"{impl} failed:\n{out.stderr[-3000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_build_seconds() -> str:
    """Build the C kernel in a fresh cache (what a first run ever pays), then load the normal cache."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GLMSNAKE_CACHE_DIR": tmp}
        code = "import time,torch; t=time.perf_counter(); from glmsnake.convert import fp8_kernel as m; "
        code += "k=m.native_kernel(); print(time.perf_counter()-t, k is not None)"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False, cwd=ROOT)
        cold = out.stdout.split() if out.returncode == 0 else ["nan", "False"]
    t = time.perf_counter()
    kernel = fp8_kernel.native_kernel()
    warm = time.perf_counter() - t
    if kernel is None:
        return f"not available ({fp8_kernel.native_kernel_error()}); torch ops instead"
    return (f"{'AVX2' if kernel.vector else 'scalar'}, first build {float(cold[0]):.2f} s (once per machine, "
            f"cached, not in the timings below), load and self-check {warm * 1e3:.0f} ms (in the timings)")  # fmt: skip


def phase_line(r: dict) -> str:
    phases = dict(r["phases"])
    walls = {k.removesuffix("_wall"): phases.pop(k) for k in list(phases) if k.endswith("_wall")}
    text = str({k: round(v, 2) for k, v in phases.items()})
    return text + ("; wall s: " + str({k: round(v, 2) for k, v in walls.items()}) if walls else "")


def same_shards(a: Path, b: Path) -> bool:
    for pa in shard_files(a):
        pb = b / pa.name
        if not pb.is_file() or pa.stat().st_size != pb.stat().st_size:
            return False
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            while chunk := fa.read(16 << 20):
                if chunk != fb.read(len(chunk)):
                    return False
    return len(shard_files(a)) == len(shard_files(b)) > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="input size in GB (bf16)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/glmsnake-fp8-bench"))
    ap.add_argument(
        "--out-dir", type=Path, help="where outputs go (default: --workdir); /dev/shm keeps a slow disk out"
    )
    ap.add_argument("--fsync", action="store_true", help="let glmsnake fsync shards (the baseline never does)")
    ap.add_argument("--cross-check", action="store_true", help="also convert on the CPU and compare bytes")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (alternating); the best time of each counts")
    ap.add_argument(
        "--sweep-workers", type=int, nargs="*", default=[], help="also time glmsnake at these worker counts"
    )
    ap.add_argument("--cuda-chunk", type=int, help="glmsnake's elements per chunk on a GPU (default: fp8_shard.CHUNK_ELEMENTS)")
    ap.add_argument("--sweep-cuda-chunk", type=int, nargs="*", default=[], help="also time these --cuda-chunk values")
    ap.add_argument("--child", choices=["baseline", "glmsnake"], help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.src, args.dst, args.workers, args.device, args.fsync, args.cuda_chunk)

    args.out_dir = args.out_dir or args.workdir
    t = time.perf_counter()
    src = make_input(args.workdir / "input", args.gb)
    print(f"input: {len(shard_files(src))} shards in {src} ({time.perf_counter() - t:.1f} s to make or find)")
    if args.device == "cpu":
        print(f"C kernel: {kernel_build_seconds()}")
    read_bandwidth(src)  # warm the page cache, as a converter run right after a download would find it
    read_s, nbytes = read_bandwidth(src)
    gb = nbytes / 1e9
    results = {}
    for _ in range(args.repeat):  # alternate, and keep each one's best: other tenants' load comes and goes
        for impl in ("baseline", "glmsnake"):
            r = run_child(impl, src, args.out_dir / f"out-{impl}", args)
            if impl not in results or r["seconds"] < results[impl]["seconds"]:
                results[impl] = r
    identical = same_shards(args.out_dir / "out-baseline", args.out_dir / "out-glmsnake")

    print(
        f"\n{gb:.2f} GB of bf16 shards, device {args.device}, {args.workers} workers, {os.cpu_count()} cores, "
        f"best of {args.repeat}, outputs in {args.out_dir}"
    )
    print(f"{'':<22}{'seconds':>9}{'GB/s in':>10}{'CPU s':>8}{'peak RSS':>12}")
    print(f"{'plain file read':<22}{read_s:>9.2f}{gb / read_s:>10.2f}")
    for impl, r in results.items():
        row = f"{r['seconds']:>9.2f}{gb / r['seconds']:>10.2f}{r['cpu_seconds']:>8.2f}{r['maxrss_kb'] / 1e6:>9.2f} GB"
        print(f"{impl:<22}{row}")
    b, g = results["baseline"], results["glmsnake"]
    print(f"\nthroughput ratio glmsnake/baseline: {b['seconds'] / g['seconds']:.2f}x")
    print(f"CPU time ratio baseline/glmsnake:   {b['cpu_seconds'] / g['cpu_seconds']:.2f}x")
    print(f"peak RSS ratio glmsnake/baseline:   {g['maxrss_kb'] / b['maxrss_kb']:.3f}")
    print(f"glmsnake / plain read bandwidth:    {read_s / g['seconds']:.0%}")
    print(f"output shards byte-identical:       {identical}")
    print("glmsnake time per phase, summed over workers (s):", phase_line(g))
    sweep = [(n, None) for n in args.sweep_workers] + [(None, c) for c in args.sweep_cuda_chunk]
    for n, c in sweep:
        label = f"{n} workers" if n else f"cuda chunk {c}"
        out = args.out_dir / f"out-{'w' if n else 'c'}{n or c}"
        r = run_child("glmsnake", src, out, args, workers=n, cuda_chunk=c, fatal=False)
        if r is None:
            continue
        same = same_shards(args.out_dir / "out-baseline", out)
        print(
            f"glmsnake with {label}: {r['seconds']:.2f} s, {gb / r['seconds']:.2f} GB/s "
            f"({read_s / r['seconds']:.0%} of read), CPU {r['cpu_seconds']:.2f} s, RSS {r['maxrss_kb'] / 1e6:.2f} GB, "
            f"identical {same}; phases {phase_line(r)}"
        )
        shutil.rmtree(out, ignore_errors=True)
    if args.cross_check and args.device == "cuda":
        cpu_args = argparse.Namespace(**{**vars(args), "device": "cpu"})
        print(f"C kernel for the CPU run: {kernel_build_seconds()}")
        c = run_child("glmsnake", src, args.out_dir / "out-cpu", cpu_args, fatal=False)
        if c is not None:
            same = same_shards(args.out_dir / "out-cpu", args.out_dir / "out-glmsnake")
            print(
                f"glmsnake on CPU: {c['seconds']:.2f} s ({gb / c['seconds']:.2f} GB/s, {read_s / c['seconds']:.0%} of read), "
                f"CPU {c['cpu_seconds']:.2f} s; GPU bytes == CPU bytes: {same}; phases {phase_line(c)}"
            )
    if not args.keep:
        for d in args.out_dir.glob("out-*"):
            shutil.rmtree(d, ignore_errors=True)
    if not identical:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
