"""C sources of the vectorisable exp, tanh, sigmoid, log and softplus of the C target (helpers of the table of
scalar functions, ``core.scalar_functions``), for double and float.

libm's exp, expm1 and tanh are calls that gcc cannot vectorise without ``-ffast-math`` (which
bpc never uses: it breaks inf/nan handling). These helpers are branch-free (every choice a
``?:`` select that gcc turns into a blend), so that a loop applying them runs in SIMD registers
at -O3: exp by Cody-Waite reduction ``y = k*ln2 + r`` (``|r| <= ln2/2``), a Taylor polynomial of
expm1(r) and a scale 2^k made from the bits of ``k`` (two factors, so that subnormal results
and overflow to inf come out as libm's); tanh from that, by the form that is most accurate for
each |x| (an odd Taylor polynomial below 0.3, ``-t/(t + 2)`` with ``t = expm1(-2|x|)`` below
0.75, ``1 - 2v/(1 + v)`` with ``v = exp(-2|x|)`` above), as glibc picks expm1 forms for its
tanh; sigmoid as ``1/(1 + v)`` or ``v/(1 + v)``, ``v = exp(-|x|)``, which never overflows.
log as fdlibm's: ``x = 2^e * m`` with ``m`` in [sqrt(2)/2, sqrt(2)) read from the bits (the
exponent converted to floating point by the 2^52 trick, not by an integer conversion that
AVX2 lacks; subnormals scaled up first), ``log(m) = f - (f^2/2 - s*(f^2/2 + R(s^2)))`` with
``f = m - 1``, ``s = f/(2 + f)`` and R the Taylor series of ``2*atanh(s)/s - 2`` (10 terms in
double, 5 in float: the first omitted term is below a tenth of an ulp). softplus as
``max(x, 0) + log1p(v)``, ``v = exp(-|x|)`` in (0, 1], ``log1p(v) = log(u) + (v - (u - 1))/u``
with ``u = 1 + v`` rounded (the second term is what the rounding of u lost).

Accuracy: tests/test_c_math.py measures each helper's largest error against the exact value
(long double, double for float) over wide ranges: in double exp 0.93 ulp, tanh 2.18, sigmoid
2.08, log 0.78, softplus 1.74 (glibc: exp 0.70, tanh 1.16, log 0.60, softplus by log1p 1.36);
in float exp 0.93, tanh 2.16, sigmoid 2.11, log 0.77, softplus 1.77 (NumPy's float32 exp and
log: 2.29 and 3.17). tests/test_c_backend.py checks tanh's every branch against NumPy. +-inf and nan give what libm gives: tanh(+-inf) = +-1,
sigmoid(+inf) = 1, sigmoid(-inf) = 0, exp(-inf) = 0, exp(inf) = inf, log(0) = -inf,
log(x < 0) = nan, log(inf) = inf, softplus(inf) = inf, softplus(-inf) = 0, nan stays nan; tanh
keeps the sign of zero.
"""
from __future__ import annotations

from fractions import Fraction
from math import factorial

# tanh(a) = a + a^3 * P(a^2), P's coefficients from the Taylor series (below 0.3 the terms
# after the last fall under half an ulp)
_TANH_TAYLOR = (Fraction(-1, 3), Fraction(2, 15), Fraction(-17, 315), Fraction(62, 2835), Fraction(-1382, 155925),
                Fraction(21844, 6081075), Fraction(-929569, 638512875), Fraction(6404582, 10854718875),
                Fraction(-443861162, 1856156927625), Fraction(18888466084, 194896477400625),
                Fraction(-113927491862, 2900518163668125))

# per element type: the type, its unsigned integer of the same width, mantissa bits, exponent
# bias, the round-to-integer shift (1.5 * 2^mantissa), ln2 split so that k*ln2_hi is exact,
# the degree of the expm1 polynomial, the number of tanh terms, and the clamps of exp's argument
_TYPES = {
    "double": dict(uint="uint64_t", bits=52, bias=1023, shift="0x1.8p52", ln2_hi="0x1.62e42fee00000p-1",
                   ln2_lo="0x1.a39ef35793c76p-33", inv_ln2="0x1.71547652b82fep0", degree=14, tanh_terms=11,
                   exp_lo="-746.0", exp_hi="710.0", tanh_lo="-40.0", suffix="",
                   mant_mask="0x000fffffffffffffu", one_bits="0x3ff0000000000000u", two_bits="0x4330000000000000u",
                   two_p="0x1p52", tiny="0x1p-1022", sub_scale="0x1p54", sub_bits=54.0, log_terms=10),
    "float": dict(uint="uint32_t", bits=23, bias=127, shift="0x1.8p23f", ln2_hi="0x1.62e4p-1f",
                  ln2_lo="0x1.7f7d1cp-20f", inv_ln2="0x1.715476p0f", degree=8, tanh_terms=5,
                  exp_lo="-104.0f", exp_hi="89.0f", tanh_lo="-20.0f", suffix="f",
                  mant_mask="0x007fffffu", one_bits="0x3f800000u", two_bits="0x4b000000u",
                  two_p="0x1p23f", tiny="0x1p-126f", sub_scale="0x1p25f", sub_bits=25.0, log_terms=5),
}


def _lit(value, t):
    text = repr(float(value))
    if "e" not in text and "." not in text:
        text += ".0"
    return text + t["suffix"]


def _horner(var, coeffs, t):
    """C expression of c0 + var*(c1 + var*(c2 + ...))."""
    out = _lit(coeffs[-1], t)
    for c in reversed(coeffs[:-1]):
        out = f"{_lit(c, t)} + {var} * ({out})"
    return out


def _reduce(real, t, two_factor):
    """Lines computing from ``y`` (already clamped): ``p`` = expm1(r) and the scale ``s`` = 2^k
    (two_factor: ``s1 * s2`` = 2^k, each factor a normal number)."""
    u, b, bias = t["uint"], t["bits"], t["bias"]
    coeffs = [Fraction(1, factorial(j)) for j in range(2, t["degree"] + 1)]
    lines = [
        f"    const {real} kd0 = y * {t['inv_ln2']} + {t['shift']};   /* k = round(y/ln2), in the low bits */",
        f"    const {real} kd = kd0 - {t['shift']};",
        f"    const {real} r = (y - kd * {t['ln2_hi']}) - kd * {t['ln2_lo']};",
        f"    const {real} p = r + r * r * ({_horner('r', coeffs, t)});   /* expm1(r) */",
    ]
    if not two_factor:
        lines += [
            f"    {u} kb;",
            "    memcpy(&kb, &kd0, sizeof kb);",
            f"    kb = (kb + {bias}u) << {b};   /* the bits of 2^k */",
            f"    {real} s;",
            "    memcpy(&s, &kb, sizeof s);",
        ]
    else:
        lines += [
            f"    const {real} k1d0 = kd * {_lit(0.5, t)} + {t['shift']};   /* k = k1 + k2, each a normal exponent */",
            f"    const {real} k2d0 = (kd - (k1d0 - {t['shift']})) + {t['shift']};",
            f"    {u} k1, k2;",
            "    memcpy(&k1, &k1d0, sizeof k1);",
            "    memcpy(&k2, &k2d0, sizeof k2);",
            f"    k1 = (k1 + {bias}u) << {b};",
            f"    k2 = (k2 + {bias}u) << {b};",
            f"    {real} s1, s2;",
            "    memcpy(&s1, &k1, sizeof s1);",
            "    memcpy(&s2, &k2, sizeof s2);",
        ]
    return lines


def c_exp(real, fs):
    t = _TYPES[real]
    return "\n".join([
        f"/* exp, vectorisable (see compiler/core/scalar_c_math.py): within 1 ulp of libm's; 0 below",
        f" * {t['exp_lo']}, inf above {t['exp_hi']}, subnormal results scaled in two steps */",
        f"static inline {real} bpc_exp{fs}({real} y)",
        "{",
        f"    y = y < {t['exp_lo']} ? {t['exp_lo']} : (y > {t['exp_hi']} ? {t['exp_hi']} : y);   /* nan stays nan */",
        *_reduce(real, t, two_factor=True),
        f"    return (({_lit(1, t)} + p) * s1) * s2;",
        "}",
    ])


def c_tanh(real, fs):
    t = _TYPES[real]
    one, two = _lit(1, t), _lit(2, t)
    poly = _horner("a2", list(_TANH_TAYLOR[:t["tanh_terms"]]), t)
    return "\n".join([
        f"/* tanh, vectorisable (see compiler/core/scalar_c_math.py): a Taylor polynomial below 0.3,",
        f" * else from t = expm1(-2|x|) and v = exp(-2|x|) = t + 1 of one reduction: -t/(t + 2) below",
        f" * 0.75, 1 - 2v/(1 + v) above (within 3 ulp of libm's tanh); +-inf gives +-1, nan nan */",
        f"static inline {real} bpc_tanh{fs}({real} x)",
        "{",
        f"    const {real} a = fabs{fs}(x);",
        f"    const {real} a2 = a * a;",
        f"    const {real} series = a + a * a2 * ({poly});",
        f"    {real} y = -{two} * a;",
        f"    y = y < {t['tanh_lo']} ? {t['tanh_lo']} : y;   /* exp(y) is below half an ulp of 1 there */",
        *_reduce(real, t, two_factor=False),
        f"    const {real} tm = s * p + (s - {one});   /* expm1(y) */",
        f"    const {real} v = s * p + s;             /* exp(y) */",
        f"    const int mid = a < {_lit(0.75, t)};",
        f"    const {real} q = (mid ? -tm : {two} * v) / (mid ? tm + {two} : {one} + v);",
        f"    const {real} z = a < {_lit(0.3, t)} ? series : (mid ? q : {one} - q);",
        f"    return copysign{fs}(z, x);",
        "}",
    ])


def c_sigmoid(real, fs):
    t = _TYPES[real]
    one = _lit(1, t)
    return "\n".join([
        f"/* 1/(1 + exp(-x)) without overflow, vectorisable (see compiler/core/scalar_c_math.py): v = exp(-|x|)",
        f" * is never above 1; 1/(1 + v) for x >= 0, v/(1 + v) below */",
        f"static inline {real} bpc_sigmoid{fs}({real} x)",
        "{",
        f"    {real} y = -fabs{fs}(x);",
        f"    y = y < {t['exp_lo']} ? {t['exp_lo']} : y;",
        *_reduce(real, t, two_factor=True),
        f"    const {real} v = (({one} + p) * s1) * s2;",
        f"    return (x >= 0 ? {one} : v) / ({one} + v);",
        "}",
    ])


def _log_core(real, t, x, out, scaled=None):
    """Lines setting ``out`` to log(x) for a positive, finite, normal ``x`` (fdlibm's form: see
    the module docstring); ``scaled``: a C condition under which x was multiplied by
    2^sub_bits (a subnormal), whose exponent the result takes back."""
    u, b, bias = t["uint"], t["bits"], t["bias"]
    one, half, two = _lit(1, t), _lit(0.5, t), _lit(2, t)
    coeffs = [Fraction(2, 2 * j + 1) for j in range(1, t["log_terms"] + 1)]
    shift = f" - ({scaled} ? {_lit(t['sub_bits'], t)} : {_lit(0, t)})" if scaled else ""
    return [
        f"    {u} ix;",
        f"    memcpy(&ix, &{x}, sizeof ix);",
        f"    const {u} eb = (ix >> {b}) | {t['two_bits']};   /* 2^{b} + the exponent field, as {real} */",
        f"    const {u} mb = (ix & {t['mant_mask']}) | {t['one_bits']};   /* the mantissa, in [1, 2) */",
        f"    {real} e, m;",
        "    memcpy(&e, &eb, sizeof e);",
        "    memcpy(&m, &mb, sizeof m);",
        f"    const int big = m > {_lit(2 ** 0.5, t)};   /* m in [sqrt(2)/2, sqrt(2)) */",
        f"    m = big ? {half} * m : m;",
        f"    e = (e - {t['two_p']}) - (big ? {_lit(bias - 1, t)} : {_lit(bias, t)}){shift};",
        f"    const {real} f = m - {one};",
        f"    const {real} hfsq = {half} * f * f;",
        f"    const {real} s = f / ({two} + f);",
        f"    const {real} z = s * s;",
        f"    const {real} R = z * ({_horner('z', coeffs, t)});",
        f"    const {real} {out} = e * {t['ln2_hi']} - ((hfsq - (s * (hfsq + R) + e * {t['ln2_lo']})) - f);",
    ]


def c_log(real, fs):
    t = _TYPES[real]
    zero = _lit(0, t)
    return "\n".join([
        f"/* log, vectorisable (see compiler/core/scalar_c_math.py): within 1 ulp of libm's; log(0) = -inf,",
        f" * log(x < 0) = nan, log(inf) = inf, nan stays nan */",
        f"static inline {real} bpc_log{fs}({real} x)",
        "{",
        f"    const int sub = x < {t['tiny']};   /* subnormal (zero, negative and nan are replaced below) */",
        f"    const {real} xs = sub ? x * {t['sub_scale']} : x;",
        *_log_core(real, t, "xs", "y", scaled="sub"),
        f"    const {real} r = x > {zero} ? y : (x == {zero} ? -({real})INFINITY : ({real})NAN);",
        f"    return x < ({real})INFINITY ? r : x;   /* inf and nan */",
        "}",
    ])


def c_softplus(real, fs):
    t = _TYPES[real]
    one, zero = _lit(1, t), _lit(0, t)
    return "\n".join([
        f"/* log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), vectorisable (see compiler/core/scalar_c_math.py):",
        f" * finite for every finite x, within 1 ulp of libm's form; softplus(inf) = inf, softplus(-inf) = 0 */",
        f"static inline {real} bpc_softplus{fs}({real} x)",
        "{",
        f"    {real} y = -fabs{fs}(x);",
        f"    y = y < {t['exp_lo']} ? {t['exp_lo']} : y;",
        *_reduce(real, t, two_factor=True),
        f"    const {real} v = (({one} + p) * s1) * s2;   /* exp(-|x|), in [0, 1] */",
        f"    const {real} u = {one} + v;",
        f"    const {real} c = (v - (u - {one})) / u;   /* log1p(v) = log(u) + c */",
        *_log_core(real, t, "u", "lu"),
        f"    const {real} sp = (x > {zero} ? x : {zero}) + (lu + c);",
        "    return x == x ? sp : x;",
        "}",
    ])
