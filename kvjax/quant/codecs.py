"""Codecs shared by the jnp reference and the kernels: scale encodings, bit packing,
the group formulas (statistics, scale and zero, encode/decode) and the range rules.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.layout.spec import F16_MAX
from kvjax.layout.spec import F32_RANGE_MAX
from kvjax.layout.spec import FP8_MAX
from kvjax.layout.spec import LOG8_BIAS
from kvjax.layout.spec import LOG8_STEP_VALUES
from kvjax.layout.spec import LOG8_STEPS
from kvjax.layout.spec import LOG8_TABLE
from kvjax.layout.spec import QuantSpec
from kvjax.layout.spec import RANGE_MARGIN
from kvjax.layout.spec import SCALE_DTYPES
from kvjax.layout.spec import ZERO_MAX

# ----------------------------------------------------------------------------- scales


def encode_scale(scale: jax.Array, scale_dtype: str) -> jax.Array:
  """Encode float32 scales, rounding up: ``decode_scale(encode_scale(s)) >= s``.

  float16 saturates at 65504 and log8 at code 255 (3756): a larger scale is
  stored as the largest, never inf. ``quantize_pages`` never asks for one:
  it clips values to ``max_abs(spec)`` first, whose groups fit.

  >>> int(encode_scale(jnp.float32(1.0), "log8"))
  160
  """
  scale = jnp.asarray(scale, jnp.float32)
  if scale_dtype == "log8":
    # smallest code whose decoded scale covers ``scale``, from the float's
    # exponent and a count of step multipliers below its mantissa: exact, and
    # the same bits on every backend (no log2/exp2, which GPUs approximate)
    e, m = split_float(jnp.maximum(scale, 1e-30))
    above = sum((m > jnp.float32(t)).astype(jnp.int32) for t in LOG8_STEP_VALUES)
    c = LOG8_STEPS * e + above + LOG8_BIAS
    return jnp.clip(c, 0, 255).astype(jnp.uint8)
  if scale_dtype == "bfloat16":   # ceil to bf16: integer ops only (lowers everywhere)
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    up = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(up, jnp.float32).astype(jnp.bfloat16)
  if scale_dtype == "float16":    # ceil to f16 (integer ops; 65504 at most), an exact convert
    return f16_round(scale, up=True).astype(jnp.float16)
  raise ValueError(f"encode_scale: scale_dtype must be one of {SCALE_DTYPES}, "
                   f"got {scale_dtype!r}")


def decode_scale(encoded: jax.Array, scale_dtype: str, *, kernel: bool = False) -> jax.Array:
  """float32 scales from their stored encoding.

  log8: a lookup in a 256-entry table on the jnp path; inside a Pallas kernel
  (``kernel=True``; Triton has no gather) ``2**e`` from exponent bits times
  one of 8 constants picked by a ``where`` chain. Both give the same bits
  (the table is that product, computed once in float32).

  >>> decode_scale(jnp.array([152, 160, 161], jnp.uint8), "log8").tolist()
  [0.5, 1.0, 1.0905077457427979]
  """
  if scale_dtype == "log8" and not kernel:
    return jnp.asarray(LOG8_TABLE)[encoded.astype(jnp.int32)]
  if scale_dtype == "log8":
    k = encoded.astype(jnp.int32) - LOG8_BIAS
    e = jnp.floor_divide(k, LOG8_STEPS)
    step = k - LOG8_STEPS * e
    mult = jnp.float32(LOG8_STEP_VALUES[0])
    for i in range(1, LOG8_STEPS):
      mult = jnp.where(step == i, jnp.float32(LOG8_STEP_VALUES[i]), mult)
    two_e = jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)   # exact 2**e
    return two_e * mult
  return encoded.astype(jnp.float32)


def split_float(x: jax.Array):
  """Exponent ``e`` (int32) and mantissa ``m`` in [1, 2) of positive normal float32 ``x``."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  e = (bits >> 23) - 127
  m = jax.lax.bitcast_convert_type((bits & 0x007FFFFF) | 0x3F800000, jnp.float32)
  return e, m


def max_scale(scale_dtype: str) -> float:
  """The largest scale a ``scale_dtype`` stores (log8 code 255, bf16's or f16's largest finite).

  >>> round(max_scale("log8"), 1), max_scale("float16")
  (3756.0, 65504.0)
  """
  if scale_dtype == "log8":
    return float(LOG8_TABLE[255])
  if scale_dtype in ("bfloat16", "float16"):
    return float(jnp.finfo(jnp.dtype(scale_dtype)).max)
  raise ValueError(f"max_scale: scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")


def max_abs(spec: QuantSpec, dtype="bfloat16") -> float:
  """The range of a spec: every group of values within ``[-max_abs, max_abs]`` is stored
  without clipping (each element within ``error_bound`` of its group's scale).

  Quantizing clips every value to this range first (NaN to 0; see
  ``clip_values``), so a value beyond it costs precision in its own group only.
  Per spec, with ``smax = max_scale(spec.scale_dtype)`` and a margin of
  ``2**-10`` (float32 rounding):

  * symmetric integer: ``(2**(bits-1) - 1) * smax``; fp8: ``448 * smax``;
  * int8 zero: ``min((2**bits - 1.5) * smax / 2, 127 * smax)`` (any group
    inside ``[-r, r]`` spans at most ``2**bits - 1.5`` steps of ``smax``);
  * minimum as zero: ``(2**bits - 1) * smax / (2 + u)`` (the stored minimum sits
    up to ``u`` relative below the true one: ``2**-7`` bf16, ``2**-10`` f16),
    and at most 65504 with a float16 minimum;
  * all of them at most ``2**126`` (group arithmetic stays finite in float32);
  * ``bits=16``: the storage ``dtype``'s largest finite value.

  Args:
    spec: the spec.
    dtype: the unquantized storage dtype (used for ``bits=16`` only).

  Returns:
    A Python float, exactly a float32 value.

  >>> round(max_abs(QuantSpec(bits=4, scale_dtype="log8")))   # 7 * 3756, less the margin
  26267
  >>> max_abs(QuantSpec(bits=8)) == 2.0 ** 126                # bf16 scales: float32's limit
  True
  """
  if not spec.is_quantized:
    return float(jnp.finfo(jnp.dtype(dtype)).max)
  smax = max_scale(spec.scale_dtype)
  qmax = (1 << spec.bits) - 1
  if spec.kind == "fp8":
    r = FP8_MAX * smax
  elif spec.symmetric:
    r = ((1 << (spec.bits - 1)) - 1) * smax
  elif spec.zero_is_min:
    u = 2.0 ** -7 if spec.zero_dtype == "bfloat16" else 2.0 ** -10
    r = qmax * smax / (2.0 + u)
  else:
    r = min((qmax - 0.5) * smax / 2.0, ZERO_MAX * smax)
  r = min(r * (1.0 - RANGE_MARGIN), F32_RANGE_MAX)
  if spec.zero_is_min and spec.zero_dtype == "float16":
    r = min(r, F16_MAX)                    # the stored minimum's own range
  r32 = np.float32(r)
  if float(r32) > r:                       # round down: the range is a promise
    r32 = np.nextafter(r32, np.float32(0))
  return float(r32)


def clip_values(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """float32 ``x`` as a spec quantizes it: clipped to ``+-max_abs(spec)``, NaN as 0.

  The rule for values a spec cannot store: a finite value beyond the range and
  ``+-inf`` saturate to ``+-max_abs`` (the sign kept); NaN is quantized as 0
  (and counts as 0 in its group's statistics, ``group_stats``). Elementwise, no
  gather: the kernels call it too.

  >>> clip_values(jnp.array([1.0, -1e9, jnp.inf, jnp.nan]), QuantSpec(bits=8, scale_dtype="log8")
  ...             ).tolist()
  [1.0, -476552.3125, 476552.3125, 0.0]
  """
  r = max_abs(spec)
  return jnp.where(x != x, 0.0, jnp.clip(x, -r, r))


def group_stats(x: jax.Array, axis: int, spec: QuantSpec, *, keepdims: bool = False):
  """``(amax, lo, hi)`` of groups of float32 ``x`` along ``axis``, as the spec sees them.

  Of ``clip_values(x, spec)``: values clipped to the range, a NaN counted as
  0 (so a group holding a NaN is stored as if that element were 0). One
  clipped array feeds all three reductions and the encoder, as the raw values
  did before (a NaN left out of ``lo`` / ``hi`` would need one array per
  reduction: 1.6x the time of per-channel quantize on CPU). ``lo`` / ``hi``
  are None for specs without a zero point.

  >>> amax, lo, hi = group_stats(jnp.array([[2.0, jnp.nan, 1e9]]), -1,
  ...                            QuantSpec(bits=4, symmetric=False, scale_dtype="log8"))
  >>> amax.tolist(), lo.tolist(), hi.tolist()
  ([27204.7578125], [0.0], [27204.7578125])
  """
  xc = clip_values(x, spec)
  amax = jnp.max(jnp.abs(xc), axis=axis, keepdims=keepdims)
  if not spec.has_zero:
    return amax, None, None
  return (amax, jnp.min(xc, axis=axis, keepdims=keepdims),
          jnp.max(xc, axis=axis, keepdims=keepdims))


def non_finite(x: jax.Array) -> jax.Array:
  """bool ``[...]``: which tokens of ``x [..., H, D]`` hold a NaN or an inf.

  >>> non_finite(jnp.array([[[1.0, jnp.nan]], [[1.0, 2.0]]])).tolist()
  [True, False]
  """
  if x.ndim < 2:
    raise ValueError(f"non_finite: x must be [..., H, D], got shape {x.shape}")
  return jnp.any(~jnp.isfinite(x), axis=(-2, -1))


def out_of_range(x: jax.Array, spec: QuantSpec, *, dtype="bfloat16") -> jax.Array:
  """bool ``[...]``: which tokens of ``x [..., H, D]`` the spec cannot store as given.

  True where a token holds a NaN, an inf or a value beyond ``max_abs(spec)``:
  what quantizing clips or saturates (``clip_values``). The same test for
  either axis: the range is per element, so for a channel-axis spec a token is
  flagged iff one of its values would be clipped in its page's group (the
  page's other tokens are stored as if it were clipped). ``bits=16``: a
  non-finite value, or one beyond ``dtype``'s largest finite value. Cheap:
  one compare per element and a reduction over ``H, D``; jittable.

  Args:
    x: float ``[..., H, D]`` new K or V tokens (any leading axes, e.g. ``[B, T]``).
    spec: the spec they are stored in.
    dtype: the unquantized storage dtype (``bits=16`` only).

  Returns:
    bool ``[...]`` (x's leading axes).

  >>> spec = QuantSpec(bits=4, scale_dtype="log8")
  >>> out_of_range(jnp.array([[[1.0, 3e4]], [[1.0, -2.0]], [[jnp.inf, 0.0]]]), spec).tolist()
  [True, False, True]
  """
  if x.ndim < 2:
    raise ValueError(f"out_of_range: x must be [..., H, D], got shape {x.shape}")
  r = max_abs(spec, dtype)
  return jnp.any(~(jnp.abs(x.astype(jnp.float32)) <= r), axis=(-2, -1))   # NaN: not <=


# ----------------------------------------------------------------------------- packing


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """Pack uint8 codes ``[..., D]`` (< 2**bits) into ``[..., D * bits // 8]`` bytes.

  Planar within a byte: element ``j + k*W`` goes to byte ``j``, bits ``k*bits``.

  >>> pack_codes(jnp.array([1, 2, 3, 4], jnp.uint8), 4).tolist()
  [49, 66]
  """
  n = 8 // bits
  if n == 1:
    return codes.astype(jnp.uint8)
  d = codes.shape[-1]
  pieces = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], n, d // n)
  shifts = (jnp.arange(n, dtype=jnp.uint32) * bits)[:, None]
  return jnp.sum(pieces << shifts, axis=-2).astype(jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of ``pack_codes``: uint8 ``[..., W]`` -> uint8 codes ``[..., W * 8 // bits]``.

  >>> unpack_codes(jnp.array([49, 66], jnp.uint8), 4).tolist()
  [1, 2, 3, 4]
  """
  n = 8 // bits
  if n == 1:
    return packed
  mask = jnp.uint8((1 << bits) - 1)
  return jnp.concatenate([(packed >> (k * bits)) & mask for k in range(n)], axis=-1)


# ----------------------------------------------------------------------------- groups


def grouped(x: jax.Array, spec: QuantSpec, g: int):
  """View ``[..., S, H, D]`` as groups; returns (view, reduce axis)."""
  *lead, s, h, d = x.shape
  if spec.axis == "token":
    return x.reshape(*lead, s, h, d // g, g), -1
  return x.reshape(*lead, s // g, g, h, d), -3


def ungrouped(xg: jax.Array, shape) -> jax.Array:
  return xg.reshape(shape)


def group_scale(amax: jax.Array, lo: Optional[jax.Array], hi: Optional[jax.Array],
                spec: QuantSpec) -> jax.Array:
  """float32 scale of groups from their stats (``lo``/``hi`` for asymmetric specs).

  ``zero_dtype="int8"``: the zero point is ``round(lo / scale)`` (int8); the
  scale is widened just enough that neither the zero nor any code clips, so
  every element decodes within ``scale / 2``. ``zero_dtype="bfloat16"`` /
  ``"float16"``: pass the stored minimum (``min_floor(lo, zero_dtype)``) as
  ``lo``; the scale spans
  ``hi - lo`` in ``2**bits - 1`` steps.
  """
  if spec.kind == "fp8":
    return amax / FP8_MAX
  if spec.symmetric:
    return amax / ((1 << (spec.bits - 1)) - 1)
  qmax = (1 << spec.bits) - 1
  if spec.zero_is_min:
    return (hi - lo) / qmax
  return jnp.maximum((hi - lo) / (qmax - 0.5), jnp.abs(lo) / ZERO_MAX)


def min_floor(lo: jax.Array, dtype: str = "bfloat16") -> jax.Array:
  """float32 ``lo`` rounded down to a ``dtype`` value (``<= lo``; integer ops only).

  ``dtype`` is "bfloat16" or "float16" (``f16_round``: saturates at
  +-65504, so a ``lo`` below -65504 gives -65504, the one case above ``lo``).

  >>> float(min_floor(jnp.float32(-1.001))), float(min_floor(jnp.float32(1.001)))
  (-1.0078125, 1.0)
  >>> float(min_floor(jnp.float32(-1.001), "float16"))
  -1.001953125
  """
  if dtype == "float16":
    return f16_round(lo, up=False)
  if dtype != "bfloat16":
    raise ValueError(f"min_floor: dtype must be 'bfloat16' or 'float16', got {dtype!r}")
  bits = jax.lax.bitcast_convert_type(jnp.asarray(lo, jnp.float32), jnp.uint32)
  neg = (bits >> 31) == 1
  down = jnp.where(neg, bits + jnp.uint32(0xFFFF), bits) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(down, jnp.float32)


def f16_round(x: jax.Array, *, up: bool) -> jax.Array:
  """float32 ``x`` rounded to a float16 value toward +inf (``up``) or -inf, as float32.

  Integer ops on the float32 bits only (no ``nextafter``, no conversion
  rounding), so it lowers everywhere (Pallas's Triton path included) and
  ``.astype(float16)`` of the result is exact. float16's last place is 13
  float32 mantissa bits for normal values (``|x| >= 2**-14``) and the fixed
  ``2**-24`` below (subnormals): the low ``clip(126 - E, 13, 23)`` bits of a
  float32 with biased exponent ``E`` are cleared, after adding them all once
  when rounding away from zero; ``|x| < 2**-24`` gives 0 or ``+-2**-24``.
  Results saturate at ``+-65504`` (float16's largest finite), so
  ``x < -65504`` rounded down (or ``x > 65504`` rounded up) gives the
  largest finite value, never inf; nan stays nan.

  >>> f16_round(jnp.array([1.0005, -1.0005, 1e-8, -1e-8, 7e4, -7e4]), up=False).tolist()
  [1.0, -1.0009765625, 0.0, -5.960464477539063e-08, 65504.0, -65504.0]
  >>> f16_round(jnp.array([1.0005, 0.0, 1e-8]), up=True).tolist()
  [1.0009765625, 0.0, 5.960464477539063e-08]
  """
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
  sign = bits & jnp.uint32(0x80000000)
  mag = bits & jnp.uint32(0x7FFFFFFF)
  exp = (mag >> 23).astype(jnp.int32)
  drop = jnp.clip(126 - exp, 13, 23).astype(jnp.uint32)
  mask = (jnp.uint32(1) << drop) - jnp.uint32(1)
  away = (sign == 0) if up else (sign != 0)       # the magnitude grows
  r = jnp.where(away, bits + mask, bits) & ~mask
  tiny = jnp.where(away & (mag != 0), sign | jnp.uint32(0x33800000), sign)   # 0x33800000: 2**-24
  r = jnp.where(exp < 103, tiny, r)                                          # |x| < 2**-24
  return jnp.clip(jax.lax.bitcast_convert_type(r, jnp.float32), -F16_MAX, F16_MAX)


def group_params(amax: jax.Array, lo: Optional[jax.Array], hi: Optional[jax.Array],
                 spec: QuantSpec, *, kernel: bool = False):
  """Encoded scale, decoded float32 scale and float32 zero of groups from their stats.

  The zero is None for symmetric specs; for ``zero_dtype="int8"`` an integer
  in units of the scale, for ``"bfloat16"`` / ``"float16"`` the minimum
  rounded down to that dtype (``min_floor``).
  Either way it is stored exactly by ``zero.astype(stored zero dtype)``.
  ``kernel=True`` (inside a Pallas kernel): ``round_half_even`` and the
  gather-free scale decode, which Pallas's Triton path lowers; same values.

  >>> enc, s, z = group_params(None, jnp.float32(-1.0), jnp.float32(2.0),
  ...                          QuantSpec(bits=2, symmetric=False, zero_dtype="bfloat16"))
  >>> float(s), float(z)
  (1.0, -1.0)
  """
  z = min_floor(lo, spec.zero_dtype) if spec.zero_is_min else None
  enc = encode_scale(group_scale(amax, lo if z is None else z, hi, spec), spec.scale_dtype)
  s = decode_scale(enc, spec.scale_dtype, kernel=kernel)
  if spec.has_zero and z is None:
    z = zero_point(lo, s, round_half_even if kernel else jnp.round)
  return enc, s, z


def round_half_even(x: jax.Array) -> jax.Array:
  """``jnp.round`` (half to even) from ``floor`` alone, exactly, for float32 ``x``.

  Pallas's Triton lowering has no ``round``: the shared encoders use this
  inside the kernels (``kernel=True``), the jnp path keeps ``jnp.round`` (one
  op, not six, on every element). ``x - floor(x)`` and the halvings are exact in
  float32, so the values equal ``jnp.round(x)`` (-0.5 gives +0, not -0) and
  kernel and reference codes agree bit for bit.

  >>> round_half_even(jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4, -2.6])).tolist()
  [0.0, 2.0, 2.0, 0.0, -2.0, 2.0, -3.0]
  """
  f = jnp.floor(x)
  d = x - f
  odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0
  return jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


def inverse(s: jax.Array) -> jax.Array:
  return jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)


def zero_point(lo: jax.Array, s: jax.Array, rnd=jnp.round) -> jax.Array:
  """float32 integer zero points ``round(lo / s)`` in int8 range (0 where s == 0)."""
  return jnp.clip(jnp.where(s > 0, rnd(lo * inverse(s)), 0.0), -ZERO_MAX - 1, ZERO_MAX)


def encode_values(x: jax.Array, s: jax.Array, z: Optional[jax.Array], spec: QuantSpec, *,
                  kernel: bool = False):
  """Codes of float32 ``x`` given broadcastable decoded scales and zero points.

  Returns uint8 codes (unpacked) for integer specs, float8_e4m3fn for fp8.
  For ``zero_dtype="bfloat16"`` / ``"float16"`` specs ``z`` is the minimum: ``(x - z) / s``.
  ``kernel=True`` rounds with ``round_half_even`` (Triton has no ``round``).
  """
  rnd = round_half_even if kernel else jnp.round
  if spec.zero_is_min and spec.levels is not None:   # nearest level: count midpoints below
    t = (x - z) * inverse(s)
    lc = spec.level_codes
    return sum((t > float(np.float32((a + b) / 2))).astype(jnp.uint8)
               for a, b in zip(lc, lc[1:])).astype(jnp.uint8)
  if spec.zero_is_min:
    return jnp.clip(rnd((x - z) * inverse(s)), 0, (1 << spec.bits) - 1).astype(jnp.uint8)
  xs = x * inverse(s)
  if spec.kind == "fp8":
    return jnp.clip(xs, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
  if spec.symmetric:
    half = 1 << (spec.bits - 1)
    return (jnp.clip(rnd(xs), 1 - half, half - 1) + half).astype(jnp.uint8)
  return jnp.clip(rnd(xs - z), 0, (1 << spec.bits) - 1).astype(jnp.uint8)


def decode_values(u: jax.Array, s: jax.Array, z: Optional[jax.Array],
                  spec: QuantSpec) -> jax.Array:
  """float32 values ``s * (code + zero)`` from unpacked codes (or fp8 values).

  ``zero_dtype="bfloat16"`` / ``"float16"`` specs: ``s * code + zero`` (the zero is the minimum).
  """
  if spec.zero_is_min and spec.levels is not None:   # a where-chain: lowers in every kernel
    lc = spec.level_codes
    lv = jnp.full(u.shape, lc[0], jnp.float32)
    for c in range(1, len(lc)):
      lv = jnp.where(u == c, jnp.float32(lc[c]), lv)
    return lv * s + z.astype(jnp.float32)
  u = u.astype(jnp.float32)
  if spec.zero_is_min:
    return u * s + z.astype(jnp.float32)
  if spec.kind == "int":
    u = u - float(1 << (spec.bits - 1)) if spec.symmetric else u + z.astype(jnp.float32)
  return u * s


def error_bound(spec: QuantSpec, scale: jax.Array) -> jax.Array:
  """Largest |x - dequantize(quantize(x))| per group given decoded scales.

  For values within ``max_abs(spec)``; a value beyond it is first clipped to
  ``+-max_abs`` (its group's scale is that of the clipped group) and the bound
  holds against the clipped value. Integer specs: half a step. fp8 e4m3: half an ulp of the largest value
  (3 mantissa bits: 2**-4 relative of 448 * scale). Non-uniform levels: the
  larger of the distance from either end of the range to its outer level and
  half the widest gap between levels.
  """
  if spec.kind == "fp8":
    return scale * FP8_MAX * 2.0 ** -4
  if spec.levels is not None:
    lc = spec.level_codes
    qmax = (1 << spec.bits) - 1
    worst = max(lc[0], qmax - lc[-1], *((b - a) / 2 for a, b in zip(lc, lc[1:])))
    return scale * worst
  return scale * 0.5


