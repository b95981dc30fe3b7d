"""The FP8 quantization math (design section 4), on one chunk of rows at a time.

Every strategy is the same computation over rectangular *groups* of the weight
that share one scale: 128x128 blocks (block), whole rows (channel) or the whole
tensor (tensor). For each group: amax = max|w| (zero padding never changes it),
scale = float32(max(amax, 1e-12)) / 448 with the max taken in the weight's own
dtype (as slime's tool does), q = clamp(w / scale, -448, 448) in float32, then
cast to float8_e4m3fn (round to nearest even; the clamp matters because the
cast does not saturate). Division, not multiplication by a reciprocal, so the
result is the correctly rounded quotient whatever the vectorization or device.

Scale tensors, by strategy (what SGLang reads; transformers reads block only):
- block:   `<m>.weight_scale_inv` float32 [ceil(out/bs0), ceil(in/bs1)]  (fp8 quant_method)
- channel: `<m>.weight_scale`     float32 [out, 1]  (compressed-tensors, strategy "channel")
- tensor:  `<m>.weight_scale`     float32 [1]       (fp8 quant_method without weight_block_size)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from glmsnake.errors import GlmsnakeError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12
STRATEGIES = ("block", "channel", "tensor")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def parse_block_size(value) -> tuple[int, int]:
    """Two positive integers, or a GlmsnakeError that says so."""
    try:
        items = list(value)
        ok = len(items) == 2 and all(int(str(v)) == float(str(v)) and int(str(v)) > 0 for v in items)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GlmsnakeError(
            f"block size must be two positive integers, got {value!r}",
            "pass e.g. --block-size 128 128 (rows, columns of one scale block)",
        )
    return int(str(items[0])), int(str(items[1]))


@dataclass(frozen=True)
class Scheme:
    strategy: str = "block"
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise GlmsnakeError(f"unknown FP8 strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        object.__setattr__(self, "block_size", parse_block_size(self.block_size))

    def scale_key(self, weight_key: str) -> str:
        suffix = "weight_scale_inv" if self.strategy == "block" else "weight_scale"
        return weight_key.removesuffix("weight") + suffix

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.strategy == "block":
            return (ceil_div(rows, self.block_size[0]), ceil_div(cols, self.block_size[1]))
        if self.strategy == "channel":
            return (rows, 1)
        return (1,)

    def row_multiple(self) -> int:
        """Chunks of rows must be a multiple of this (except the last), so groups never straddle chunks."""
        return self.block_size[0] if self.strategy == "block" else 1

    def padded_cols(self, cols: int) -> int:
        return ceil_div(cols, self.block_size[1]) * self.block_size[1] if self.strategy == "block" else cols

    def quantization_config(self, modules_to_not_convert: list[str]) -> dict:
        """config.json's quantization_config, as SGLang reads it for this strategy."""
        if self.strategy == "channel":
            return _compressed_tensors_channel_config(modules_to_not_convert)
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        if self.strategy == "block":
            cfg["weight_block_size"] = list(self.block_size)
        cfg["modules_to_not_convert"] = modules_to_not_convert
        return cfg


def _compressed_tensors_channel_config(ignore: list[str]) -> dict:
    def quant_args(strategy: str, dynamic: bool, observer) -> dict:
        return {
            "num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": observer,
            "observer_kwargs": {},
        }  # fmt: skip

    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ignore,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": quant_args("channel", False, "minmax"),
                "input_activations": quant_args("token", True, None),
                "output_activations": None,
            }
        },
    }


def scale_from_amax(amax: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """float32(max(amax, 1e-12)) / 448; `amax` holds values exact in `weight_dtype`.

    The divisor is a tensor on amax's device: given a Python number, CUDA multiplies by its
    reciprocal (1/448 is inexact), which differs from the division in the last bit of some
    scales; the CPU divides. A tensor divisor makes both devices divide.
    """
    clamped = amax.to(weight_dtype).clamp(min=AMAX_FLOOR).to(torch.float32)
    return clamped / torch.full((), FP8_MAX, dtype=torch.float32, device=clamped.device)


def group_amax(f: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
    """max|f| over each g0 x g1 group of the float32 matrix f (its shape a multiple of the group)."""
    rows, cols = f.shape
    v = f.view(rows // g0, g0, cols // g1, g1)
    # max(amax, -amin) equals max|x| exactly and skips writing an |x| copy.
    return torch.maximum(v.amax(dim=(1, 3)), v.amin(dim=(1, 3)).neg_())


def quantize_groups_(f: torch.Tensor, scale: torch.Tensor, g0: int, g1: int, q_out: torch.Tensor) -> None:
    """q_out = fp8(clamp(f / scale, -448, 448)) per group; f is overwritten (it is scratch)."""
    rows, cols = f.shape
    v = f.view(rows // g0, g0, cols // g1, g1)
    v.div_(scale.view(rows // g0, 1, cols // g1, 1)).clamp_(-FP8_MAX, FP8_MAX)
    q_out.copy_(f)


class ChunkQuantizer:
    """Reusable float32 / fp8 scratch for one worker, so chunks allocate nothing.

    A chunk is some rows of a weight; `load` pads it with zeros to whole groups
    (exactly the reference's zero padding), `amax` gives its groups' max|w|,
    `quantize` its fp8 values, cropped back to the chunk's shape. For the tensor
    strategy a chunk is one group, and the caller combines the chunks' amax.
    """

    def __init__(self, scheme: Scheme, device: torch.device | str = "cpu"):
        self.scheme = scheme
        self.device = torch.device(device)
        self._f = torch.empty(0, dtype=torch.float32, device=self.device)
        self._q = torch.empty(0, dtype=FP8, device=self.device)

    def _scratch(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._f.numel() < rows * cols:
            self._f = torch.empty(rows * cols, dtype=torch.float32, device=self.device)
            self._q = torch.empty(rows * cols, dtype=FP8, device=self.device)
        return self._f[: rows * cols].view(rows, cols), self._q[: rows * cols].view(rows, cols)

    def _group(self, f: torch.Tensor) -> tuple[int, int]:
        if self.scheme.strategy == "block":
            return self.scheme.block_size
        if self.scheme.strategy == "channel":
            return 1, f.shape[1]
        return f.shape

    def load(self, x: torch.Tensor) -> torch.Tensor:
        r, c = x.shape
        m = self.scheme.row_multiple()
        f, _ = self._scratch(ceil_div(r, m) * m, self.scheme.padded_cols(c))
        f[:r, :c].copy_(x)
        if f.shape[1] > c:
            f[:, c:].zero_()
        if f.shape[0] > r:
            f[r:, :].zero_()
        return f

    def amax(self, f: torch.Tensor) -> torch.Tensor:
        return group_amax(f, *self._group(f))

    def quantize(self, f: torch.Tensor, scale: torch.Tensor, r: int, c: int) -> torch.Tensor:
        """The fp8 chunk (r x c; a strided view of the scratch when the columns were padded)."""
        _, q = self._scratch(*f.shape)
        quantize_groups_(f, scale, *self._group(f), q)
        return q[:r, :c]


def nonfinite_error(name: str) -> GlmsnakeError:
    return GlmsnakeError(
        f"tensor {name} holds NaN or Inf values; it cannot be quantized",
        "check the source checkpoint (a corrupt download or a diverged training run)",
    )


def check_finite(scale: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise nonfinite_error(name)


# ---------------------------------------------------------------- the native CPU kernel
#
# On a CPU the torch ops above make five passes over a float32 copy of each chunk, and torch's
# float32 -> e4m3fn cast is scalar; together ~2.5 ns per weight. The C kernel below does the same
# math in one pass per group over the bf16 bytes (AVX2 where the CPU has it, plain C otherwise),
# ~0.4 ns per weight. It is compiled with the system's C compiler on first use (~1 s) and cached
# (GLMSNAKE_CACHE_DIR, else $XDG_CACHE_HOME/glmsnake or ~/.cache/glmsnake), keyed by the source
# and the compiler. Before first use it must reproduce torch's result for every bf16 value; if
# there is no compiler, the build fails or that check fails, the torch path above is used
# (GLMSNAKE_FP8_NATIVE=0 forces that). It serves bf16 weights with block or channel groups.

KERNEL_SOURCE = r"""
/* glmsnake: FP8 (e4m3fn) quantization of bf16 weights by groups of g0 x g1, exact.
 * Per group (clipped at the matrix edge; zero padding never changes the result):
 *   amax  = max |w| in bf16 (an integer max of the sign-cleared bits: exact; Inf/NaN sort above)
 *   scale = (float)max(amax, floor) / 448.0f             (IEEE division, never a reciprocal)
 *   q     = e4m3fn(clamp((float)w / scale, -448, 448))   (torch's fp8e4m3fn_from_fp32_value)
 * A group whose amax is Inf/NaN stops the call (return 1). Past that check every |w| <= amax
 * is finite and |w / scale| <= 448.0001, so the vector path needs no NaN case; the scalar
 * path is exact for every input. Build without -ffast-math: divisions must stay divisions. */
#include <stdint.h>
#include <string.h>

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint8_t e4m3_clamped(float f) {
    uint32_t b = f2u(f), sign = b & 0x80000000u;
    b ^= sign;
    if (b > 0x7F800000u) return (uint8_t)(0x7Fu | (sign >> 24)); /* NaN stays NaN */
    if (b > 0x43E00000u) b = 0x43E00000u;                          /* |f| clamped to 448 */
    uint32_t r;
    if (b < (121u << 23)) /* below 2^-6: an e4m3 subnormal, rounded by the FPU (nearest even) */
        r = f2u(u2f(b) + u2f(141u << 23)) - (141u << 23);
    else
        r = (b + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((b >> 20) & 1u)) >> 20;
    return (uint8_t)(r | (sign >> 24));
}

static inline uint32_t amax_span_scalar(const uint16_t *x, int64_t n, uint32_t m) {
    for (int64_t c = 0; c < n; c++) {
        uint32_t a = x[c] & 0x7FFFu;
        m = a > m ? a : m;
    }
    return m;
}

static inline void quant_span_scalar(const uint16_t *x, uint8_t *q, int64_t n, float d) {
    for (int64_t c = 0; c < n; c++) q[c] = e4m3_clamped(u2f((uint32_t)x[c] << 16) / d);
}

/* One block-row (rows <= g0): pass 1 takes each group's amax row by row (sequential reads,
 * the running maxima kept as bits in the scale row), then the scales, then pass 2 quantizes. */
#define DEFINE_BLOCK_ROW(NAME, ATTR, AMAX_SPAN, QUANT_SPAN)                                            \
    ATTR static int NAME(const uint16_t *x, int64_t rows, int64_t cols, int64_t g1, float floor,       \
                         float *scale, uint8_t *q) {                                                   \
        const int64_t ng1 = (cols + g1 - 1) / g1;                                                      \
        uint32_t *acc = (uint32_t *)scale; /* float and uint32_t: same size, no aliasing use mixed */   \
        for (int64_t j = 0; j < ng1; j++) acc[j] = 0;                                                  \
        for (int64_t i = 0; i < rows; i++)                                                             \
            for (int64_t j = 0, c0 = 0; j < ng1; j++, c0 += g1)                                        \
                acc[j] = AMAX_SPAN(x + i * cols + c0, (c0 + g1 < cols ? g1 : cols - c0), acc[j]);      \
        for (int64_t j = 0; j < ng1; j++) {                                                            \
            if (acc[j] >= 0x7F80u) return 1; /* Inf or NaN */                                          \
            float a = u2f(acc[j] << 16);                                                               \
            float s = (a > floor ? a : floor) / 448.0f;                                                \
            memcpy(&scale[j], &s, 4);                                                                  \
        }                                                                                              \
        for (int64_t i = 0; i < rows; i++)                                                             \
            for (int64_t j = 0, c0 = 0; j < ng1; j++, c0 += g1)                                        \
                QUANT_SPAN(x + i * cols + c0, q + i * cols + c0, (c0 + g1 < cols ? g1 : cols - c0),    \
                           scale[j]);                                                                  \
        return 0;                                                                                      \
    }

DEFINE_BLOCK_ROW(block_row_scalar, , amax_span_scalar, quant_span_scalar)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2")))

AVX2 static inline __m256i quant8_avx2(const uint16_t *x, __m256 d) {
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF), top = _mm256_set1_epi32(0x43E00000);
    const __m256i bias = _mm256_set1_epi32((int32_t)0xC407FFFFu), one = _mm256_set1_epi32(1);
    const __m256i small = _mm256_set1_epi32(121 << 23), dmask = _mm256_set1_epi32(141 << 23);
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x)), 16);
    __m256i b = _mm256_castps_si256(_mm256_div_ps(_mm256_castsi256_ps(w), d));
    __m256i sign = _mm256_srli_epi32(_mm256_andnot_si256(absmask, b), 24);
    __m256i a = _mm256_min_epi32(_mm256_and_si256(b, absmask), top);
    __m256i nor = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(a, bias), _mm256_and_si256(_mm256_srli_epi32(a, 20), one)), 20);
    __m256i tiny = _mm256_cmpgt_epi32(small, a);
    if (!_mm256_testz_si256(tiny, tiny)) { /* some |q| < 2^-6: e4m3 subnormals, rounded by the FPU */
        __m256i den = _mm256_sub_epi32(
            _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(dmask))), dmask);
        nor = _mm256_blendv_epi8(nor, den, tiny);
    }
    return _mm256_or_si256(nor, sign);
}

AVX2 static inline void quant_span_avx2(const uint16_t *x, uint8_t *q, int64_t n, float scale) {
    const __m256 d = _mm256_set1_ps(scale);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t c = 0;
    for (; c + 32 <= n; c += 32) {
        __m256i r0 = quant8_avx2(x + c, d), r1 = quant8_avx2(x + c + 8, d);
        __m256i r2 = quant8_avx2(x + c + 16, d), r3 = quant8_avx2(x + c + 24, d);
        __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(r0, r1), _mm256_packus_epi32(r2, r3));
        _mm256_storeu_si256((__m256i *)(q + c), _mm256_permutevar8x32_epi32(p, order));
    }
    quant_span_scalar(x + c, q + c, n - c, scale);
}

AVX2 static inline uint32_t amax_span_avx2(const uint16_t *x, int64_t n, uint32_t m) {
    const __m256i absmask = _mm256_set1_epi16(0x7FFF);
    __m256i acc = _mm256_setzero_si256();
    int64_t c = 0;
    for (; c + 16 <= n; c += 16)
        acc = _mm256_max_epu16(acc, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + c)), absmask));
    __m128i h = _mm_max_epu16(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_max_epu16(h, _mm_srli_si128(h, 8));
    h = _mm_max_epu16(h, _mm_srli_si128(h, 4));
    h = _mm_max_epu16(h, _mm_srli_si128(h, 2));
    uint32_t v = (uint32_t)_mm_extract_epi16(h, 0);
    return amax_span_scalar(x + c, n - c, v > m ? v : m);
}

DEFINE_BLOCK_ROW(block_row_avx2, AVX2, amax_span_avx2, quant_span_avx2)
static int have_avx2(void) { return __builtin_cpu_supports("avx2"); }
#else
static int have_avx2(void) { return 0; }
#define block_row_avx2 block_row_scalar
#endif

int glmsnake_fp8_vector_isa(void) { return have_avx2(); }

/* x: rows x cols bf16 bits, row-major; scale: ceil(rows/g0) x ceil(cols/g1) float32; q: rows x cols */
int glmsnake_fp8_quantize_bf16(const uint16_t *x, int64_t rows, int64_t cols, int64_t g0, int64_t g1,
                               float floor, float *scale, uint8_t *q, int vector) {
    const int64_t ng1 = (cols + g1 - 1) / g1;
    const int avx2 = vector && have_avx2();
    for (int64_t i0 = 0; i0 < rows; i0 += g0) {
        const int64_t r = i0 + g0 < rows ? g0 : rows - i0;
        float *s = scale + (i0 / g0) * ng1;
        int bad = avx2 ? block_row_avx2(x + i0 * cols, r, cols, g1, floor, s, q + i0 * cols)
                       : block_row_scalar(x + i0 * cols, r, cols, g1, floor, s, q + i0 * cols);
        if (bad) return 1;
    }
    return 0;
}

/* the conversion alone, for the tests: e4m3fn(clamp(x, -448, 448)) */
void glmsnake_fp8_convert_f32(const float *x, int64_t n, uint8_t *q) {
    for (int64_t i = 0; i < n; i++) q[i] = e4m3_clamped(x[i]);
}
"""


class NativeKernel:
    """ctypes binding of the compiled kernel (ctypes releases the GIL during the call)."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.glmsnake_fp8_quantize_bf16.argtypes = [p, i64, i64, i64, i64, ctypes.c_float, p, p, ctypes.c_int]
        lib.glmsnake_fp8_quantize_bf16.restype = ctypes.c_int
        lib.glmsnake_fp8_convert_f32.argtypes = [p, i64, p]
        lib.glmsnake_fp8_convert_f32.restype = None
        lib.glmsnake_fp8_vector_isa.restype = ctypes.c_int
        self.vector = bool(lib.glmsnake_fp8_vector_isa())
        # torch's clamp(min=1e-12) on a bf16 amax: the floor as that bf16 value
        self.floor = float(torch.zeros((), dtype=torch.bfloat16).clamp(min=AMAX_FLOOR).float())

    def quantize(self, x: torch.Tensor, g0: int, g1: int, scale: torch.Tensor, q: torch.Tensor, vector=True) -> bool:
        """scale[ceil(r/g0), ceil(c/g1)] and q[r, c] (e4m3fn bits) of the bf16 matrix x; False if not finite."""
        rows, cols = x.shape
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and q.is_contiguous() and scale.is_contiguous()
        assert q.numel() == x.numel() and q.element_size() == 1 and scale.dtype == torch.float32
        assert scale.numel() == ceil_div(rows, g0) * ceil_div(cols, g1)
        rc = self._lib.glmsnake_fp8_quantize_bf16(
            x.data_ptr(), rows, cols, g0, g1, self.floor, scale.data_ptr(), q.data_ptr(), int(vector)
        )
        return rc == 0

    def convert_f32(self, x: torch.Tensor) -> torch.Tensor:
        """e4m3fn(clamp(x, -448, 448)) by the kernel's scalar conversion (for tests)."""
        x = x.contiguous()
        assert x.dtype == torch.float32
        q = torch.empty(x.shape, dtype=FP8)
        self._lib.glmsnake_fp8_convert_f32(x.data_ptr(), x.numel(), q.data_ptr())
        return q


_native_lock = threading.Lock()
_native: dict[str, object] = {}


def native_kernel() -> NativeKernel | None:
    """The compiled kernel (built and checked once per process), or None to use the torch path."""
    if os.environ.get("GLMSNAKE_FP8_NATIVE", "1") == "0":
        return None
    with _native_lock:
        if "kernel" not in _native:
            try:
                kernel = NativeKernel(_build_kernel())
                _self_check(kernel)
                _native["kernel"], _native["error"] = kernel, None
            except Exception as e:  # noqa: BLE001  (no compiler, a failed build, a wrong result: torch does the math)
                _native["kernel"], _native["error"] = None, f"{type(e).__name__}: {e}"
                print(f"glmsnake: FP8 C kernel unavailable, using torch ops (slower): {e}", file=sys.stderr)
        return _native["kernel"]


def native_kernel_error() -> str | None:
    return _native.get("error")


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = cc.split()
    if shutil.which(cmd[0]) is None:
        for name in ("cc", "gcc", "clang"):
            if shutil.which(name):
                return [name]
        raise RuntimeError("no C compiler found (set CC)")
    return cmd


def _cache_dir() -> Path:
    if os.environ.get("GLMSNAKE_CACHE_DIR"):
        return Path(os.environ["GLMSNAKE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glmsnake"


def _build_kernel() -> Path:
    cc = _compiler()
    flags = ["-O2", "-fPIC", "-shared", "-fno-fast-math", "-std=gnu99"]
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    key = hashlib.sha256("\0".join([KERNEL_SOURCE, " ".join(cc + flags), version, platform.machine()]).encode())
    name = f"fp8_kernel-{key.hexdigest()[:16]}.so"
    for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"glmsnake-{os.getuid()}"):
        try:
            cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = cache.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                continue  # a folder others can write to could hand us their library: never load from it
            if (cache / name).is_file():
                return cache / name
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                c_file = Path(tmp) / "fp8_kernel.c"
                c_file.write_text(KERNEL_SOURCE)
                out = subprocess.run(
                    [*cc, *flags, str(c_file), "-o", str(Path(tmp) / name)],
                    capture_output=True, text=True, timeout=300, check=False,
                )  # fmt: skip
                if out.returncode:
                    raise RuntimeError(f"{' '.join(cc)} failed: {out.stderr.strip()[-2000:]}")
                os.replace(Path(tmp) / name, cache / name)  # atomic: parallel builders race harmlessly
            return cache / name
        except OSError:
            continue  # an unwritable cache folder: try the next one
    raise RuntimeError("no writable folder for the compiled FP8 kernel")


def _self_check(kernel: NativeKernel) -> None:
    """Every finite bf16 value, in groups with small and huge amax, equals the torch path's result."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = every[torch.isfinite(every)]
    for vector in (True, False):
        for g1 in (1, 128, 4099):
            x = finite[: (finite.numel() // g1) * g1].reshape(-1, g1).contiguous()
            got_s = torch.empty(x.shape[0], 1)
            got_q = torch.empty(x.shape, dtype=FP8)
            ok = kernel.quantize(x, 1, g1, got_s, got_q.view(torch.uint8), vector=vector)
            qz = ChunkQuantizer(Scheme("channel"))
            f = qz.load(x)
            want_s = scale_from_amax(qz.amax(f), torch.bfloat16)
            want_q = qz.quantize(f, want_s, *x.shape)
            if not (ok and torch.equal(got_s, want_s) and torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))):
                raise RuntimeError(f"kernel result differs from torch's (vector={vector}, group {g1})")
