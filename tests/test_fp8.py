"""convert-fp8: exact math, output format, streaming/resume, refusals, transformers as a reader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from fp8_reference import dequant_error_ok, expand_scale, reference_quantize

from conftest import skip_or_fail
from glmsnake import atomic, publish, resolve, staleness
from glmsnake.architectures import ARCHITECTURES
from glmsnake.convert import fp8, fp8_kernel, fp8_shard
from glmsnake.convert.tiny import make_tiny
from glmsnake.steps import convert as convert_steps

GLM4_MOE = ARCHITECTURES["glm4_moe"]

FP8_DTYPE = torch.float8_e4m3fn


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wf():
    return resolve.load({})


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, wf) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "hf"
    make_tiny(out, wf.preset.model, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory, tiny_hf, wf) -> Path:
    out = tmp_path_factory.mktemp("tiny_fp8") / "fp8"
    fp8.convert(tiny_hf, out, block_size=wf.preset.convert.fp8.block_size, workers=2, device="cpu", log=io.StringIO())
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(*dirs: Path) -> dict[str, tuple[int, str]]:
    """Every file under the folders with its mtime and sha256, to prove nothing was touched."""
    snap = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")) if Path(d).exists() else []:
            if p.is_file():
                snap[str(p)] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


# ---------------------------------------------------------------- exact math, through the whole converter


def adversarial(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights with an all-zero block, huge values, denormal-range and sub-floor values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[: rows // 3, : cols // 4] = 0.0  # all-zero blocks
    w[rows // 3 : rows // 3 + 5, cols // 2 :] *= 1e4 if dtype == torch.float16 else 1e35  # near the dtype's max
    tiny = torch.finfo(dtype).tiny
    w[-7:, :40] = torch.randn(min(7, rows), min(40, cols), generator=g) * tiny * 0.3  # subnormal in the weight dtype
    w[-1, -1] = 1e-13 if dtype != torch.float16 else 0.0  # a block whose amax is below the 1e-12 floor
    w[0, -1] = -w.abs().max()  # a negative extreme
    return w.to(dtype)


SHAPES = [(1500, 700), (128, 256), (97, 33), (1, 130), (130, 1), (5, 5)]


def write_model(dir: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A minimal HF checkpoint folder: shards, index, config.json, a tokenizer-like file."""
    dir.mkdir(parents=True)
    names = list(tensors)
    plan = {k: f"model-{i % shards + 1:05d}-of-{shards:05d}.safetensors" for i, k in enumerate(names)}
    for shard in sorted(set(plan.values())):
        save_file({k: tensors[k] for k in names if plan[k] == shard}, dir / shard, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dir / fp8.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": plan}))
    (dir / "config.json").write_text(json.dumps({"model_type": "glm4_moe", "hidden_size": 8}))
    (dir / "tokenizer.json").write_text('{"model": "chars"}')
    return dir


@pytest.mark.parametrize("native", [True, False], ids=["c-kernel", "torch-ops"])
@pytest.mark.parametrize("strategy,block", [("block", (32, 32)), ("block", (128, 128)), ("block", (16, 48)),
                                            ("channel", (128, 128)), ("tensor", (128, 128))])  # fmt: skip
def test_fast_path_is_bit_identical_to_reference(tmp_path, strategy, block, native, monkeypatch):
    """Both CPU paths: the C kernel (bf16 weights, block/channel) and the torch ops (everything else)."""
    if native:
        require_kernel()
    if not native:
        monkeypatch.setenv("GLMSNAKE_FP8_NATIVE", "0")
    monkeypatch.setattr(fp8_shard, "TASK_BYTES", 1 << 16)  # split shards into many tasks that write one file at once
    monkeypatch.setattr(fp8_shard, "NATIVE_CHUNK_BYTES", 1 << 14)  # and tensors into several chunks
    tensors = {}
    for i, (r, c) in enumerate(SHAPES):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = adversarial(r, c, torch.bfloat16, seed=i)
    tensors["model.layers.9.mlp.experts.3.down_proj.weight"] = adversarial(200, 72, torch.float16, seed=7)
    tensors["model.layers.9.mlp.shared_experts.up_proj.weight"] = adversarial(64, 100, torch.float32, seed=8)
    src = write_model(tmp_path / "in", tensors, shards=2)
    fp8.convert(src, tmp_path / "out", strategy=strategy, block_size=block, workers=2, device="cpu", log=io.StringIO())

    out = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(read_all(shard))
    scale_suffix = "weight_scale_inv" if strategy == "block" else "weight_scale"
    expected_files = {}
    for name, w in tensors.items():
        q_ref, s_ref = reference_quantize(w, strategy, block)
        scale_key = name.removesuffix("weight") + scale_suffix
        assert out[name].dtype == FP8_DTYPE and out[scale_key].dtype == torch.float32
        assert out[scale_key].shape == s_ref.shape
        assert torch.equal(bits(out[name]), bits(q_ref)), f"{name}: fp8 bytes differ from the reference"
        assert torch.equal(bits(out[scale_key]), bits(s_ref)), f"{name}: scales differ from the reference"
        expected_files[name], expected_files[scale_key] = q_ref, s_ref
        # an independent dequantization check, and no NaN/Inf
        assert torch.isfinite(out[name].float()).all() and torch.isfinite(out[scale_key]).all()
        assert dequant_error_ok(w, out[name], expand_scale(out[scale_key], w.shape, strategy, block)).all()

    # whole files equal what safetensors' own save_file writes for the reference tensors
    index = json.loads((tmp_path / "out" / fp8.INDEX_NAME).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        ref_path = tmp_path / f"ref-{shard}"
        save_file({k: expected_files[k] for k, s in index["weight_map"].items() if s == shard}, ref_path,
                  metadata={"format": "pt"})  # fmt: skip
        assert (tmp_path / "out" / shard).read_bytes() == ref_path.read_bytes()


# ---------------------------------------------------------------- the C kernel against torch, value by value


def require_kernel():
    """The C kernel; a skip only where no compiler exists (and not in CI), a failure otherwise."""
    k = fp8_kernel.native_kernel()
    if k is None:
        skip_or_fail(f"no C kernel here: {fp8_kernel.native_kernel_error()} (apt-get install gcc)",
                     missing_on_this_machine=fp8_kernel.kernel_missing_for_want_of_a_compiler())
    return k


@pytest.fixture
def kernel():
    return require_kernel()


def test_kernel_conversion_equals_torch_cast_on_float32_bit_patterns(kernel):
    """e4m3fn(clamp(x)) for a lattice over all 2^32 patterns (NaN, Inf, subnormals, ties) and random ones.

    (The whole 2^32 space was checked once, 0 mismatches; too slow for every test run.)
    """
    g = torch.Generator().manual_seed(0)
    lattice = torch.arange(0, 1 << 32, 4093, dtype=torch.int64)
    rand = torch.randint(0, 1 << 32, (1 << 20,), generator=g, dtype=torch.int64)
    for patterns in (lattice, rand):
        x = (patterns - (patterns >= (1 << 31)).long() * (1 << 32)).to(torch.int32).view(torch.float32)
        want = x.clamp(-448.0, 448.0).to(FP8_DTYPE).view(torch.uint8)
        assert torch.equal(kernel.convert_f32(x).view(torch.uint8), want)


@pytest.mark.parametrize("vector", [True, False], ids=["avx2", "scalar"])
def test_kernel_equals_reference_on_adversarial_weights(kernel, vector):
    if vector and not kernel.vector:
        pytest.skip("this CPU has no AVX2")
    fp8_kernel._self_check(kernel)  # every finite bf16 value, in groups of 1, 128 and 4099
    for i, (rows, cols) in enumerate([*SHAPES, (300, 1000)]):
        w = adversarial(rows, cols, torch.bfloat16, seed=100 + i)
        for strategy, block in (("block", (128, 128)), ("block", (16, 48)), ("channel", (128, 128))):
            q_ref, s_ref = reference_quantize(w, strategy, block)
            g0, g1 = block if strategy == "block" else (1, cols)
            s = torch.empty(s_ref.numel(), dtype=torch.float32)
            q = torch.empty(rows, cols, dtype=FP8_DTYPE)
            assert kernel.quantize(w, g0, g1, s, q.view(torch.uint8), vector=vector)
            assert torch.equal(bits(q), bits(q_ref)) and torch.equal(bits(s.view(s_ref.shape)), bits(s_ref))
    w = adversarial(64, 64, torch.bfloat16, seed=1)
    w[3, 3] = float("inf")
    assert not kernel.quantize(w, 32, 32, torch.empty(4), torch.empty(64, 64, dtype=torch.uint8), vector=vector)


def test_without_a_compiler_torch_ops_do_the_math(tmp_path, monkeypatch):
    monkeypatch.setattr(fp8_kernel, "_native", {})  # forget this process's kernel
    monkeypatch.setenv("GLMSNAKE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(fp8_kernel.shutil, "which", lambda name: None)
    assert fp8_kernel.native_kernel() is None and "no C compiler" in fp8_kernel.native_kernel_error()
    w = adversarial(130, 260, torch.bfloat16, seed=3)
    src = write_model(tmp_path / "in", {"model.layers.0.mlp.up_proj.weight": w})
    fp8.convert(src, tmp_path / "out", workers=1, device="cpu", log=io.StringIO())
    out = read_all(tmp_path / "out" / "model-00001-of-00001.safetensors")
    q_ref, s_ref = reference_quantize(w, "block")
    assert torch.equal(bits(out["model.layers.0.mlp.up_proj.weight"]), bits(q_ref))
    assert torch.equal(bits(out["model.layers.0.mlp.up_proj.weight_scale_inv"]), bits(s_ref))


# ---------------------------------------------------------------- the tiny checkpoint: what a user gets


def test_tiny_output_format(tiny_hf, tiny_fp8, wf):
    bs = list(wf.preset.convert.fp8.block_size)
    src_index = json.loads((tiny_hf / fp8.INDEX_NAME).read_text())
    index = json.loads((tiny_fp8 / fp8.INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(set(src_index["weight_map"].values()))

    tensors, where = {}, {}
    for shard in sorted(set(index["weight_map"].values())):
        for k, v in read_all(tiny_fp8 / shard).items():
            tensors[k], where[k] = v, shard
    assert index["weight_map"] == where  # every tensor, scales included, in the shard that holds it
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    quantized = {k for k, t in tensors.items() if t.dtype == FP8_DTYPE}
    # quantized: attention, dense, shared-expert and routed-expert projections, MTP layer (3) included
    for k in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.1.mlp.experts.7.gate_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
              "model.layers.3.self_attn.o_proj.weight", "model.layers.3.mlp.experts.0.down_proj.weight",
              "model.layers.3.mlp.shared_experts.down_proj.weight"]:  # fmt: skip
        assert k in quantized, k
        assert tensors[k.removesuffix("weight") + "weight_scale_inv"].dtype == torch.float32
    # kept as they were: embeddings, head, norms, router, expert bias, biases, eh_proj, shared_head
    src = {}
    for shard in sorted(set(src_index["weight_map"].values())):
        src.update(read_all(tiny_hf / shard))
    kept = set(src) - quantized
    for k in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight",
              "model.layers.3.hnorm.weight", "model.layers.3.shared_head.norm.weight",
              "model.layers.0.self_attn.k_norm.weight", "model.layers.2.post_attention_layernorm.weight"]:  # fmt: skip
        assert k in kept, k
    for k in kept:
        assert tensors[k].dtype == src[k].dtype and torch.equal(bits(tensors[k]), bits(src[k])), k
    assert quantized == {k for k in src if GLM4_MOE.quantized_weight.search(k)}

    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == json.loads((tiny_hf / "config.json").read_text())
    assert {k: qc[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": bs}  # fmt: skip
    skip = set(qc["modules_to_not_convert"])
    assert {"lm_head", "model.embed_tokens", "model.norm", "model.layers.1.mlp.gate", "model.layers.3.eh_proj",
            "model.layers.3.shared_head.norm", "model.layers.0.input_layernorm"} <= skip  # fmt: skip
    assert not any(m.endswith("_proj") and not m.endswith("eh_proj") for m in skip)

    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (tiny_fp8 / name).read_bytes() == (tiny_hf / name).read_bytes()
    assert not [p.name for p in tiny_fp8.iterdir() if (p.name.startswith(".") and p.name != publish.FILES_NAME) or p.name.endswith(".incomplete")]


def test_every_quantized_tensor_dequantizes_within_bound(tiny_hf, tiny_fp8, wf):
    bs = wf.preset.convert.fp8.block_size
    src = {}
    for p in tiny_hf.glob("*.safetensors"):
        src.update(load_file(p))
    out = {}
    for p in tiny_fp8.glob("*.safetensors"):
        out.update(load_file(p))
    n = 0
    for k, q in out.items():
        assert torch.isfinite(q.float()).all(), f"{k} has NaN/Inf"
        if q.dtype == FP8_DTYPE:
            s = out[k.removesuffix("weight") + "weight_scale_inv"]
            ok = dequant_error_ok(src[k], q, expand_scale(s, q.shape, "block", bs))
            assert ok.all(), f"{k}: {int((~ok).sum())} elements outside |w - q*s| <= max(|w|/16, s/1024)"
            n += 1
    assert n == sum(1 for k in src if GLM4_MOE.quantized_weight.search(k)) > 50


def test_transformers_loads_fp8_and_logits_stay_close(tiny_hf, tiny_fp8, wf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.bfloat16).eval()
    quant = AutoModelForCausalLM.from_pretrained(tiny_fp8, dtype=torch.bfloat16).eval()
    # transformers really used our scales: its weight is exactly q * s rounded to bf16
    shard = json.loads((tiny_fp8 / fp8.INDEX_NAME).read_text())["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    with safe_open(tiny_fp8 / shard, framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale_inv")
    deq = (q.float() * expand_scale(s, q.shape, "block", wf.preset.convert.fp8.block_size)).to(torch.bfloat16)
    assert torch.equal(quant.model.layers[0].self_attn.q_proj.weight, deq)

    tok = AutoTokenizer.from_pretrained(tiny_hf)
    errors = []
    for prompt in ["What is 2+3?", "The quick brown fox jumps over the lazy dog.", "Solve: x^2 = 16"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = ref(ids).logits.float(), quant(ids).logits.float()
        errors.append(((a - b).norm() / a.norm()).item())
    # Bound: e4m3 keeps 3 mantissa bits, so each weight carries a relative rounding error of up
    # to 2^-4 (RMS ~2-3.6%); every linear passes that on to its outputs, and the tiny model chains
    # ~4 quantized linears per layer over 3 layers with norms damping the growth. Measured on the
    # tiny preset (seed 0, 32x32 blocks): 5.6-6.2% per prompt. 0.10 leaves ~1.6x headroom for
    # platform noise while failing on any real bug (a misplaced scale or a skipped dequantization
    # gives errors of order 1).
    assert 0 < max(errors) < 0.10, errors


# ---------------------------------------------------------------- step, CLI, strategies


def test_step_writes_sentinel_last_with_shard_hashes(tmp_path, tiny_hf):
    wf = resolve.load({"base_dir": str(tmp_path)})
    shutil.copytree(tiny_hf, wf.paths.hf_dir)
    sentinel = wf.paths.fp8_dir / atomic.SENTINEL_NAME
    convert_steps.convert_fp8(wf, sentinel)
    doc = json.loads(sentinel.read_text())
    assert doc["step"] == "convert_fp8" and doc["settings"] == staleness.fp8(wf)
    shards = sorted(p.name for p in wf.paths.fp8_dir.glob("*.safetensors"))
    assert sorted(doc["shards"]) == shards
    for name, digest in doc["shards"].items():
        assert atomic.sha256_file(wf.paths.fp8_dir / name) == digest
    newest = max(p.stat().st_mtime_ns for p in wf.paths.fp8_dir.iterdir() if p.name != atomic.SENTINEL_NAME)
    assert sentinel.stat().st_mtime_ns >= newest
    # a rerun (Snakemake removed the sentinel) may replace its own earlier output
    sentinel.unlink()
    convert_steps.convert_fp8(wf, sentinel)
    assert json.loads(sentinel.read_text())["shards"] == doc["shards"]


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_cli_channel_and_tensor_strategies(tmp_path, tiny_hf, strategy, capsys):
    out = tmp_path / "out"
    rc = fp8.main(["--model-dir", str(tiny_hf), "--save-dir", str(out), "--strategy", strategy,
                   "--workers", "1", "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    tensors = {}
    for p in out.glob("*.safetensors"):
        tensors.update(load_file(p))
    q = tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    s = tensors["model.layers.1.mlp.experts.2.up_proj.weight_scale"]
    assert q.dtype == FP8_DTYPE and s.shape == ((q.shape[0], 1) if strategy == "channel" else (1,))
    assert not any(k.endswith("weight_scale_inv") for k in tensors)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if strategy == "channel":
        assert qc["quant_method"] == "compressed-tensors"
        assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel" and "lm_head" in qc["ignore"]
    else:
        assert qc["quant_method"] == "fp8" and "weight_block_size" not in qc


# ---------------------------------------------------------------- streaming, staging, resume


def test_rerun_skips_verified_shards_and_redoes_damaged_ones(tmp_path, tiny_hf, tiny_fp8):
    save = tmp_path / "fp8"
    kw = {"block_size": (32, 32), "workers": 2, "device": "cpu", "log": io.StringIO()}
    first = fp8.convert(tiny_hf, save, **kw)
    # The state a run killed after two shards leaves: a hidden staging folder with those shards
    # and their .ok records, nothing at the final name.
    stage = publish.temp_dir_for(save)
    shards = sorted(first.shards)
    stage.mkdir()
    for name in shards[:2]:
        shutil.copy2(save / name, stage / name)
        atomic.write_json(
            stage / f".{name}.ok.json",
            fp8._ok_record(_plan(tiny_hf, name), fp8.Scheme("block", (32, 32)), first.shards[name]),
        )
    (stage / f"{shards[2]}.incomplete").write_bytes(b"half a shard")
    shutil.rmtree(save)
    kept_mtime = (stage / shards[0]).stat().st_mtime_ns
    # damage the second one: it must be redone, not trusted
    with open(stage / shards[1], "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))

    second = fp8.convert(tiny_hf, save, **kw)
    assert second.converted == shards[1:]
    assert second.shards == first.shards
    assert (save / shards[0]).stat().st_mtime_ns == kept_mtime
    assert not stage.exists()
    assert not [p.name for p in save.iterdir() if (p.name.startswith(".") and p.name != publish.FILES_NAME) or p.name.endswith(".incomplete")]


def _plan(model_dir: Path, shard: str):
    from glmsnake.convert.safetensors_io import read_header

    return fp8.plan_shard(shard, read_header(model_dir / shard), fp8.Scheme("block", (32, 32)), GLM4_MOE.quantized_weight)


def test_killed_run_leaves_nothing_finished_and_rerun_resumes(tmp_path):
    import signal
    import subprocess
    import time

    g = torch.Generator().manual_seed(3)
    tensors = {
        f"model.layers.{i}.mlp.experts.{e}.up_proj.weight": torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
        for i in range(4)
        for e in range(16)
    }
    src = write_model(tmp_path / "in", tensors, shards=4)  # 4 shards of 32 MB
    save, stage = tmp_path / "out", publish.temp_dir_for(tmp_path / "out")
    cmd = [sys.executable, "-m", "glmsnake.convert.fp8", "--model-dir", str(src), "--save-dir", str(save),
           "--workers", "1", "--device", "cpu", "--no-fsync"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list(stage.glob(".*.ok.json")) and proc.poll() is None:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # as a node failure or `scancel -s KILL` would
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert not save.exists()  # nothing at the final name, so nothing looks finished
    done = sorted(p.name.removeprefix(".").removesuffix(".ok.json") for p in stage.glob(".*.ok.json"))
    assert 1 <= len(done) < 4
    kept = {name: (stage / name).stat().st_mtime_ns for name in done}

    result = fp8.convert(src, save, workers=2, device="cpu", log=io.StringIO())
    assert sorted(result.converted) == sorted(set(result.shards) - set(done))
    assert all((save / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    clean = fp8.convert(src, tmp_path / "clean", workers=2, device="cpu", log=io.StringIO())
    assert result.shards == clean.shards  # the resumed output is the same bytes as an uninterrupted one


def test_failed_run_leaves_nothing_that_looks_finished(tmp_path, capsys):
    good = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 64).to(torch.bfloat16) for i in range(3)}
    bad = torch.randn(64, 64)
    bad[3, 3] = float("nan")
    src = write_model(tmp_path / "in", {**good, "model.layers.9.mlp.down_proj.weight": bad.to(torch.bfloat16)}, 4)
    save = tmp_path / "out"
    assert fp8.main(["--model-dir", str(src), "--save-dir", str(save), "--workers", "1", "--device", "cpu"]) == 2
    assert "model.layers.9.mlp.down_proj.weight holds NaN or Inf" in capsys.readouterr().err
    assert not save.exists()
    stage = publish.temp_dir_for(save)
    assert len(list(stage.glob(".*.ok.json"))) == 3  # the good shards are kept for the rerun
    assert not [p for p in ("config.json", fp8.INDEX_NAME, fp8.MARKER_NAME) if (stage / p).exists()]


def test_streaming_memory_is_bounded_by_chunks_not_shards(tmp_path):
    """A 48 MB shard converts without ever holding the shard: memory grows by less than its size.
    (How much less, against a plain read, is benchmarks/fp8_convert.py's peak RSS ratio.)"""
    import subprocess

    tensors = {f"model.layers.0.mlp.experts.{i}.gate_proj.weight": torch.randn(1536, 1024).to(torch.bfloat16)
               for i in range(16)}  # fmt: skip
    src = write_model(tmp_path / "in", tensors, shards=1)
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss also counts the (large) pytest parent.
    code = (
        "import torch; from pathlib import Path; from glmsnake.convert import fp8\n"
        "def hwm(): return int([l for l in Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmHWM')][0].split()[1])\n"
        "torch.ones(1).sum(); base = hwm()\n"
        f"fp8.main(['--model-dir', r'{src}', '--save-dir', r'{tmp_path / 'out'}', '--device', 'cpu', '--no-fsync'])\n"
        "print(hwm() - base)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew_kb = int(run.stdout.split()[-1])
    shard_kb = (src / "model-00001-of-00001.safetensors").stat().st_size // 1024
    assert (tmp_path / "out" / "model-00001-of-00001.safetensors").is_file()
    assert grew_kb < shard_kb, f"RSS grew {grew_kb} kB converting a {shard_kb} kB shard"


def test_progress_lines_in_a_log_and_a_bar_on_a_terminal():
    log = io.StringIO()
    p = fp8.Progress(2_000_000_000, 2, log, interval=0.0)
    p.add_bytes(1_000_000_000)
    p.shard_done()
    p.close()
    assert "convert-fp8: 1/2 shards, 1.00/2.00 GB" in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    p = fp8.Progress(2_000_000, 2, term)
    p.add_bytes(2_000_000)
    p.shard_done()
    p.shard_done()
    p.close()
    assert "shards 2/2" in term.getvalue() and "2.00M" in term.getvalue()


# ---------------------------------------------------------------- refusals: clear error, nothing touched


def _truncate_a_shard(model: Path) -> None:
    shard = sorted(model.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)


def _remove_a_shard(model: Path) -> None:
    min(model.glob("*.safetensors")).unlink()


BAD_INPUTS = {
    "missing shard": (_remove_a_shard, [], "lacks 1 shard"),
    "partial shard": (_truncate_a_shard, [], "not a complete safetensors file"),
    "block size zero": (None, ["--block-size", "0", "128"], "two positive integers"),
    "block size one number": (None, ["--block-size", "128"], "two positive integers"),
    "block size not a number": (None, ["--block-size", "a", "b"], "two positive integers"),
    "block size fraction": (None, ["--block-size", "1.5", "128"], "two positive integers"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, tiny_hf, case, capsys):
    damage, extra, message = BAD_INPUTS[case]
    model = copy_model(tiny_hf, tmp_path / "hf")
    if damage:
        damage(model)
    save = tmp_path / "out"
    before = snapshot(tmp_path)
    assert fp8.main(["--model-dir", str(model), "--save-dir", str(save), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err
    assert snapshot(tmp_path) == before and not save.exists() and not publish.temp_dir_for(save).exists()


def test_already_fp8_input_is_refused(tmp_path, tiny_fp8, capsys):
    fp8_copy = copy_model(tiny_fp8, tmp_path / "fp8")
    before = snapshot(tmp_path)
    assert fp8.main(["--model-dir", str(fp8_copy), "--save-dir", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert snapshot(tmp_path) == before and not (tmp_path / "again").exists()
    # even without the config entry, the FP8 tensors themselves give it away
    cfg = json.loads((fp8_copy / "config.json").read_text())
    del cfg["quantization_config"]
    (fp8_copy / "config.json").write_text(json.dumps(cfg))
    before = snapshot(tmp_path)
    assert fp8.main(["--model-dir", str(fp8_copy), "--save-dir", str(tmp_path / "again")]) == 2
    assert "already holds FP8 tensors" in capsys.readouterr().err
    assert snapshot(tmp_path) == before and not (tmp_path / "again").exists()


def test_output_folder_holding_another_model_is_not_overwritten(tmp_path, tiny_hf, tiny_fp8, capsys):
    other = copy_model(tiny_hf, tmp_path / "other-model")  # a bf16 model someone keeps there
    before = snapshot(tmp_path / "other-model")
    assert fp8.main(["--model-dir", str(tiny_hf), "--save-dir", str(other), "--device", "cpu"]) == 2
    assert "not an FP8 conversion of" in capsys.readouterr().err
    # an FP8 conversion of a different source is another model too
    foreign = copy_model(tiny_fp8, tmp_path / "foreign-fp8")
    marker = json.loads((foreign / fp8.MARKER_NAME).read_text())
    marker["source"] = "/somewhere/else"
    (foreign / fp8.MARKER_NAME).write_text(json.dumps(marker))
    before.update(snapshot(foreign))
    assert fp8.main(["--model-dir", str(tiny_hf), "--save-dir", str(foreign), "--device", "cpu"]) == 2
    assert snapshot(tmp_path / "other-model", foreign) == before
    assert not publish.temp_dir_for(other).exists() and not publish.temp_dir_for(foreign).exists()


@pytest.mark.parametrize("case", ["mount point", "read-only"])
def test_a_save_dir_that_cannot_take_the_result_is_refused_before_converting(tmp_path, tiny_hf, case):
    """In a mount namespace of the test's own: a tmpfs mounted at --save-dir, or a read-only one above it."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        skip_or_fail("mounting a tmpfs needs root and util-linux's unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    save = mnt if case == "mount point" else mnt / "fp8"
    ro = ",ro" if case == "read-only" else ""
    script = (f"mount -t tmpfs -o size=64m{ro} tmpfs {mnt} && "
              f"{sys.executable} -m glmsnake.convert.fp8 --model-dir {tiny_hf} --save-dir {save} --device cpu")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    if case == "mount point":
        assert f"--save-dir {save} is a mount point" in out.stderr and f"--save-dir {mnt / (tiny_hf.name + '-FP8')}" in out.stderr
    else:
        assert f"cannot write in {mnt} (Read-only file system)" in out.stderr
    assert "convert-fp8: " not in out.stderr  # refused before the first shard
    assert "Traceback" not in out.stderr
