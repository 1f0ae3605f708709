"""Named (key_spec, value_spec) pairs, ``PRESETS``.

Their compression (``kvjax.layout.compression``) and measured quality are in
docs/quantization.md and docs/quality.md, not here.

>>> k, v = PRESETS["int4"]
>>> k.bits, k.axis, v.axis
(4, 'channel', 'token')
"""

from __future__ import annotations

from kvjax.layout.spec import QuantSpec

# ----------------------------------------------------------------------------- presets

#: Named (key_spec, value_spec) pairs. Compression is for SmolLM2's shapes
#: (30 layers, 3 kv heads, head_dim 64) with 16-token pages, scales included.
NUQ2_LEVELS = (0.13, 0.39, 0.61, 0.87)   # 2-bit key levels, fractions of a group's range


def int2_key(scale_dtype="log8", zero_dtype="bfloat16", sink=0, levels=None) -> QuantSpec:
  """The 2-bit presets' keys: per channel over the page, the minimum as zero, window 128."""
  return QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype=scale_dtype,
                   zero_dtype=zero_dtype, residual=128, sink=sink, levels=levels)


def int2_value(sink=0) -> QuantSpec:
  """The 2-bit presets' values: per token, log8 scale, int8 zero, window 128."""
  return QuantSpec(bits=2, symmetric=False, scale_dtype="log8", residual=128, sink=sink)


PRESETS = {
    "bf16": (QuantSpec(), QuantSpec()),
    # one bf16 scale per token and head
    "int8": (QuantSpec(bits=8), QuantSpec(bits=8)),
    "fp8": (QuantSpec(bits=8, kind="fp8"), QuantSpec(bits=8, kind="fp8")),
    # KIVI's layout of DESIGN.md section 8, bf16 scales (zeros int8 here)
    "int4-kivi": (QuantSpec(bits=4, axis="channel", symmetric=False),
                  QuantSpec(bits=4, symmetric=False, group_size=32)),
    # K per channel asymmetric (log8 scale + int8 zero), V per token symmetric
    "int4": (QuantSpec(bits=4, axis="channel", symmetric=False, scale_dtype="log8"),
             QuantSpec(bits=4, scale_dtype="log8")),
    # K per channel symmetric, V per token asymmetric
    "int4-ksym": (QuantSpec(bits=4, axis="channel", scale_dtype="log8"),
                  QuantSpec(bits=4, symmetric=False, scale_dtype="log8")),
    # both asymmetric
    "int4-asym": (QuantSpec(bits=4, axis="channel", symmetric=False, scale_dtype="log8"),
                  QuantSpec(bits=4, symmetric=False, scale_dtype="log8")),
    # KIVI's V groups of 32 (asymmetric) with log8
    # scales; K as in int4 (per channel per page, asymmetric)
    "int4-g32": (QuantSpec(bits=4, axis="channel", symmetric=False, scale_dtype="log8"),
                 QuantSpec(bits=4, symmetric=False, group_size=32, scale_dtype="log8")),
    # KIVI-2 with a 64-token window (+ a bf16 ring per sequence)
    "int2-r64": (QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="log8",
                           residual=64),
                 QuantSpec(bits=2, symmetric=False, scale_dtype="log8", residual=64)),
    "int2-r128": (QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="log8",
                            residual=128),
                  QuantSpec(bits=2, symmetric=False, scale_dtype="log8", residual=128)),
    # KIVI's zero for both: the group minimum as bf16 (3 full steps at 2 bits, not 2.5),
    # log8 scale, 3 bytes a group
    "int2-kivi-r128": (QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="log8",
                                 zero_dtype="bfloat16", residual=128),
                       QuantSpec(bits=2, symmetric=False, scale_dtype="log8",
                                 zero_dtype="bfloat16", residual=128)),
    # the bf16 minimum for K only (it helps keys, it hurts values: docs/quality.md);
    # V as in int2-r128
    "int2-kmin-r128": (QuantSpec(bits=2, axis="channel", symmetric=False, scale_dtype="log8",
                                 zero_dtype="bfloat16", residual=128),
                       QuantSpec(bits=2, symmetric=False, scale_dtype="log8", residual=128)),
    # the same plus the attention sink: the first token of every sequence in full
    # precision (the sink is a per-sequence cost)
    "int2-kmin-r128-s1": (int2_key(sink=1), int2_value(sink=1)),
    # and K scales in bfloat16 instead of log8 (a finer step);
    # with 4 sink tokens, or f16 K scale and minimum: no better (docs/quality.md)
    "int2-kbf-r128-s1": (int2_key(scale_dtype="bfloat16", sink=1), int2_value(sink=1)),
    "int2-kbf-r128-s4": (int2_key(scale_dtype="bfloat16", sink=4), int2_value(sink=4)),
    "int2-kf16-r128-s4": (int2_key(scale_dtype="float16", zero_dtype="float16", sink=4),
                          int2_value(sink=4)),
    # non-uniform key levels (Lloyd-Max-like for a bell-shaped 32-token channel group)
    # and one sink token: the 2-bit target
    "int2-nuq-r128-s1": (int2_key(sink=1, levels=NUQ2_LEVELS), int2_value(sink=1)),
    "int2-nuqbf-r128-s1": (int2_key(scale_dtype="bfloat16", sink=1, levels=NUQ2_LEVELS),
                           int2_value(sink=1)),
}

