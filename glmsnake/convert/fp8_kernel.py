"""The native CPU kernel for FP8 quantization: C source, build, cache, self-check, ctypes binding.

On a CPU the torch ops of fp8_math make five passes over a float32 copy of each chunk, and
torch's float32 -> e4m3fn cast is scalar; together ~2.5 ns per weight. The C kernel here does
the same math in one pass per group over the bf16 bytes (AVX2 where the CPU has it, plain C
otherwise), ~0.4 ns per weight. It is compiled with the system's C compiler on first use (~1 s)
and cached (GLMSNAKE_CACHE_DIR, else $XDG_CACHE_HOME/glmsnake or ~/.cache/glmsnake), keyed by
the source and the compiler. Before first use it must reproduce fp8_math's torch result for
every bf16 value; if there is no compiler, the build fails or that check fails, the torch path
is used (GLMSNAKE_FP8_NATIVE=0 forces that). It serves bf16 weights with block or channel
groups. Kept apart from fp8_math, which defines the math: this module is how one machine
computes it fast, with the toolchain and cache that takes.
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
from pathlib import Path

import torch

from glmsnake.convert.fp8_math import AMAX_FLOOR, FP8, ChunkQuantizer, Scheme, ceil_div, scale_from_amax

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
                _native["no_compiler"] = isinstance(e, NoCompiler)
                print(f"glmsnake: FP8 C kernel unavailable, using torch ops (slower): {e}", file=sys.stderr)
        return _native["kernel"]


def native_kernel_error() -> str | None:
    return _native.get("error")


def kernel_missing_for_want_of_a_compiler() -> bool:
    """True when the kernel is absent only because this machine has no C compiler (nothing is wrong)."""
    return bool(_native.get("no_compiler"))


class NoCompiler(RuntimeError):
    pass


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = cc.split()
    if shutil.which(cmd[0]) is None:
        for name in ("cc", "gcc", "clang"):
            if shutil.which(name):
                return [name]
        raise NoCompiler("no C compiler found (set CC)")
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
