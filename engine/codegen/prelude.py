"""The C prelude: types, constants and the `kred_*` math helpers that op-table templates call.

`prelude(target, real, acc)` returns C99 text for target "cpu" (gcc/clang, math.h) or "cuda" (NVRTC: no libc
headers, so no INFINITY/NAN macros and no <math.h>; CUDA's device math functions are built in).

On the CPU, `exp` and `log` are our own branch-free polynomial versions: written with selects and bit casts only,
they vectorize inside `#pragma omp simd` loops without -ffast-math (which would drop the NaN/Inf handling that Min,
Max and LogSumExp need). Their error is below 2 ulp in float32 and a few ulp in float64; they return exactly 0 for
-inf, +inf for +inf and propagate NaN. Rarely used functions (sin, atan, ...) call libm.
"""
from __future__ import annotations

import re

TYPES = {"float32": "float", "float64": "double"}

_COMMON = r"""
typedef long long kred_index;
#define KRED_NO_INDEX 0x7fffffffffffffffLL
"""

_CPU_HEAD = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#define KRED_FN static inline __attribute__((always_inline))
#define KRED_INF_F32 __builtin_inff()
#define KRED_INF_F64 __builtin_inf()
#define KRED_NAN_F32 __builtin_nanf("")
#define KRED_NAN_F64 __builtin_nan("")
"""

_CUDA_HEAD = r"""
#define KRED_FN static __device__ __forceinline__
#define KRED_INF_F32 __int_as_float(0x7f800000)
#define KRED_INF_F64 __longlong_as_double(0x7ff0000000000000LL)
#define KRED_NAN_F32 __int_as_float(0x7fffffff)
#define KRED_NAN_F64 __longlong_as_double(0x7fffffffffffffffLL)
"""

# Branch-free exp/log for the CPU. exp: x = n ln2 + r, |r| <= ln2/2, exp(r) by its Taylor series (degree 7 in
# float, 12 in double, truncation error < 1e-8 / 2e-17 relative), times 2^n built from the exponent bits.
# log: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172.
_CPU_MATH = r"""
KRED_FN float kred_exp_f32(float x) {
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f; p = p * r + 1.0f / 120.0f; p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    float y = p * scale;
    y = x < -87.0f ? 0.0f : y;
    return x > 88.0f ? KRED_INF_F32 : y;
}

KRED_FN double kred_exp_f64(double x) {
    double xc = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    double n = __builtin_floor(xc * 1.4426950408889634074 + 0.5);
    double r = xc - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    double p = 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0; p = p * r + 1.0 / 3628800.0; p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0; p = p * r + 1.0 / 5040.0; p = p * r + 1.0 / 720.0; p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0; p = p * r + 1.0 / 6.0; p = p * r + 0.5; p = p * r + 1.0; p = p * r + 1.0;
    int64_t bits = ((int64_t)n + 1023) << 52;
    double scale; memcpy(&scale, &bits, 8);
    double y = p * scale;
    y = x < -708.0 ? 0.0 : y;
    return x > 709.0 ? KRED_INF_F64 : y;
}

KRED_FN float kred_log_f32(float x) {
    int tiny = x < 1.17549435e-38f;                   /* subnormal: scale up first */
    float xs = tiny ? x * 8388608.0f : x;
    int32_t bits; memcpy(&bits, &xs, 4);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    int32_t mbits = (bits & 0x007fffff) | 0x3f800000;
    float m; memcpy(&m, &mbits, 4);                   /* m in [1, 2) */
    int big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    float ef = (float)(e + big) - (tiny ? 23.0f : 0.0f);
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float p = 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f; p = p * s2 + 1.0f / 7.0f; p = p * s2 + 1.0f / 5.0f; p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    float y = ef * 0.693147180559945309f + 2.0f * s * p;
    y = x == 0.0f ? -KRED_INF_F32 : y;
    y = x < 0.0f ? KRED_NAN_F32 : y;
    y = x == KRED_INF_F32 ? x : y;
    return x != x ? x : y;
}

KRED_FN double kred_log_f64(double x) {
    int tiny = x < 2.2250738585072014e-308;
    double xs = tiny ? x * 4503599627370496.0 : x;
    int64_t bits; memcpy(&bits, &xs, 8);
    int64_t e = ((bits >> 52) & 0x7ff) - 1023;
    int64_t mbits = (bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL;
    double m; memcpy(&m, &mbits, 8);
    int64_t big = m > 1.4142135623730951;
    m = big ? m * 0.5 : m;
    double ef = (double)(e + big) - (tiny ? 52.0 : 0.0);
    double s = (m - 1.0) / (m + 1.0), s2 = s * s;
    double p = 1.0 / 23.0;
    p = p * s2 + 1.0 / 21.0; p = p * s2 + 1.0 / 19.0; p = p * s2 + 1.0 / 17.0; p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0; p = p * s2 + 1.0 / 11.0; p = p * s2 + 1.0 / 9.0; p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0; p = p * s2 + 1.0 / 3.0; p = p * s2 + 1.0;
    double y = ef * 0.69314718055994530942 + 2.0 * s * p;
    y = x == 0.0 ? -KRED_INF_F64 : y;
    y = x < 0.0 ? KRED_NAN_F64 : y;
    y = x == KRED_INF_F64 ? x : y;
    return x != x ? x : y;
}
"""

# KRED_FAST_EXP (the CUDA driver defines it under use_fast_math): float32 exp as ex2.approx.ftz of x log2(e), two
# instructions (FMUL, MUFU.EX2) against about eight for expf. Relative error <= 2^-22 + |x| 2^-24 (the rounding of
# x log2(e)), e.g. 5.3e-6 at |x| = 87; exp(-inf) = 0, exp(inf) = inf, NaN propagates; results below 2^-126 flush
# to 0. Without it, expf (<= 2 ulp). kred_exp2_f32 is the bare ex2 (the driver folds log2(e) into constants).
_CUDA_MATH = r"""
#ifndef KRED_EMULATION
KRED_FN float kred_exp2_f32(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
#else
KRED_FN float kred_exp2_f32(float x) { return exp2f(x); }
#endif
#ifdef KRED_FAST_EXP
KRED_FN float kred_exp_f32(float x) { return kred_exp2_f32(x * 1.44269504088896341f); }
#else
KRED_FN float kred_exp_f32(float x) { return expf(x); }
#endif
KRED_FN double kred_exp_f64(double x) { return exp(x); }
KRED_FN float kred_log_f32(float x) { return logf(x); }
KRED_FN double kred_log_f64(double x) { return log(x); }
"""

# libm names per type: (float, double). CUDA has the same names as device functions.
_LIBM = {"sqrt": ("sqrtf", "sqrt"), "floor": ("floorf", "floor"), "rint": ("rintf", "rint"),
         "fabs": ("fabsf", "fabs"), "sin": ("sinf", "sin"), "cos": ("cosf", "cos"), "asin": ("asinf", "asin"),
         "acos": ("acosf", "acos"), "atan": ("atanf", "atan"), "atan2": ("atan2f", "atan2"),
         "pow": ("powf", "pow")}

# Helpers over kred_real, written once with `R` for the type and `{name}` for the matching libm function.
_REAL_MATH = r"""
KRED_FN R kred_exp(R x) { return kred_exp_{S}(x); }
KRED_FN R kred_log(R x) { return kred_log_{S}(x); }
KRED_FN R kred_sqrt(R x) { return {sqrt}(x); }
KRED_FN R kred_rsqrt(R x) { return x == (R)0 ? (R)0 : (R)1 / {sqrt}(x); }
KRED_FN R kred_floor(R x) { return {floor}(x); }
KRED_FN R kred_rint(R x) { return {rint}(x); }
KRED_FN R kred_abs(R x) { return {fabs}(x); }
KRED_FN R kred_sin(R x) { return {sin}(x); }
KRED_FN R kred_cos(R x) { return {cos}(x); }
KRED_FN R kred_asin(R x) { return {asin}(x); }
KRED_FN R kred_acos(R x) { return {acos}(x); }
KRED_FN R kred_atan(R x) { return {atan}(x); }
KRED_FN R kred_atan2(R y, R x) { return {atan2}(y, x); }
KRED_FN R kred_pow(R x, R y) { return {pow}(x, y); }
KRED_FN R kred_xlogx(R x) { return x == (R)0 ? (R)0 : x * kred_log(x); }
KRED_FN R kred_sinxdivx(R x) { return x == (R)0 ? (R)1 : {sin}(x) / x; }
KRED_FN R kred_sign(R x) { return x > (R)0 ? (R)1 : (x < (R)0 ? (R)-1 : x); }
KRED_FN R kred_step(R x) { return x >= (R)0 ? (R)1 : (R)0; }
KRED_FN R kred_relu(R x) { return x < (R)0 ? (R)0 : x; }
/* max/min that propagate NaN from either side, like numpy's maximum/minimum */
KRED_FN R kred_max(R a, R b) { return (a != a || a > b) ? a : b; }
KRED_FN R kred_min(R a, R b) { return (a != a || a < b) ? a : b; }
KRED_FN R kred_clamp(R x, R lo, R hi) { return kred_min(kred_max(x, lo), hi); }
KRED_FN R kred_mod(R x, R n, R d) { return x - n * {floor}((x - d) / n); }
KRED_FN R kred_powi(R x, int n) {
    R base = n < 0 ? (R)1 / x : x, y = (R)1;
    unsigned int k = n < 0 ? (unsigned int)(-n) : (unsigned int)n;
    while (k) { if (k & 1u) y *= base; base *= base; k >>= 1; }
    return y;
}
KRED_FN R kred_round(R x, int d) {
    double p = 1.0; int k;
    for (k = 0; k < (d < 0 ? -d : d); k++) p *= 10.0;
    R scale = (R)(d < 0 ? 1.0 / p : p);
    return {rint}(x * scale) / scale;
}
KRED_FN kred_acc kred_acc_exp(kred_acc x) { return kred_exp_{A}(x); }
KRED_FN kred_acc kred_acc_log(kred_acc x) { return kred_log_{A}(x); }
KRED_FN kred_acc kred_acc_max(kred_acc a, kred_acc b) { return (a != a || a > b) ? a : b; }
"""


def prelude(target: str, real: str, acc: str) -> str:
    """The C prelude for `target` ("cpu" or "cuda"), real type `real` and accumulator type `acc`
    ("float32" or "float64" each)."""
    if target not in ("cpu", "cuda"):
        raise ValueError(f"unknown target {target!r}")
    suffix = {"float32": "f32", "float64": "f64"}
    which = 0 if real == "float32" else 1
    real_math = _REAL_MATH.replace("{S}", suffix[real]).replace("{A}", suffix[acc])
    for name, pair in _LIBM.items():
        real_math = real_math.replace("{" + name + "}", pair[which])
    real_math = re.sub(r"\bR\b", "kred_real", real_math)
    types = f"typedef {TYPES[real]} kred_real;\ntypedef {TYPES[acc]} kred_acc;\n"
    inf = f"#define KRED_INF ((kred_real)KRED_INF_{suffix[real].upper()})\n" \
          f"#define KRED_ACC_INF ((kred_acc)KRED_INF_{suffix[acc].upper()})\n"
    head, math = (_CPU_HEAD, _CPU_MATH) if target == "cpu" else (_CUDA_HEAD, _CUDA_MATH)
    return "\n".join([head, _COMMON, types, inf, math, real_math])
