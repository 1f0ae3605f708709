"""``QuantSpec``: how one of K or V is stored, validated on construction, and the
format's constants.

The layouts and guarantees are described in ``kvjax.quant`` and docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

BITS = (16, 8, 4, 2)
KINDS = ("int", "fp8")
AXES = ("token", "channel")
SCALE_DTYPES = ("bfloat16", "float16", "log8")
# int8: zero in units of the scale; bfloat16 / float16: the group minimum, rounded down
ZERO_DTYPES = ("int8", "bfloat16", "float16")
F16_MAX = 65504.0        # largest finite float16
LOG8_BIAS = 160          # log8 code of scale 1.0
LOG8_STEPS = 8           # codes per octave
# 2 ** (i / LOG8_STEPS) rounded to float32: log8 scales decode as 2**e times one
# of these (code 160 + 8e + i), bit for bit the same on every backend
LOG8_STEP_VALUES = tuple(float(np.float32(2.0 ** (i / LOG8_STEPS))) for i in range(LOG8_STEPS))
LOG8_TABLE = np.array([np.float32(2.0 ** ((c - LOG8_BIAS) // LOG8_STEPS))
                        * np.float32(LOG8_STEP_VALUES[(c - LOG8_BIAS) % LOG8_STEPS])
                        for c in range(256)], np.float32)   # every log8 code, decoded
FP8_MAX = 448.0          # largest finite float8_e4m3fn
ZERO_MAX = 127          # asymmetric zero points are int8 in units of the scale
# no spec's range goes past 2**126: a group's ``hi - lo`` (at most 2**127) and every
# scale and decoded value stay finite float32
F32_RANGE_MAX = 2.0 ** 126
# relative margin every range keeps below its exact limit, for the float32 rounding
# of the group arithmetic (``(hi - lo) / steps`` may round up by an ulp)
RANGE_MARGIN = 2.0 ** -10


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one of K or V is stored. ``bits=16`` means unquantized (the config dtype).

  Args:
    bits: 16 (none), 8, 4 (two codes per byte) or 2 (four per byte).
    kind: "int" (uniform integer levels) or "fp8" (float8_e4m3fn, bits=8, symmetric).
    symmetric: symmetric levels around 0 (no zero point) or asymmetric (int8 zero).
    axis: "token": groups of ``group_size`` channels of one token (values);
      "channel": groups of ``group_size`` tokens of one channel (keys, KIVI).
    group_size: channels per group ("token"; default head_dim) or tokens per
      group ("channel"; default page_size).
    scale_dtype: "bfloat16", "float16" or "log8" (one byte, see module doc).
    zero_dtype: asymmetric specs only. "int8": the zero point in units of the
      scale, ``round(min / scale)``, with the scale widened to
      ``(max - min) / (2**bits - 1.5)`` (one byte); "bfloat16": the group's
      minimum rounded down to bfloat16, ``x = scale * code + min`` with the
      full ``2**bits - 1`` steps (two bytes; KIVI's layout); "float16": the
      same with the minimum rounded down to float16 (two bytes, 3 more
      mantissa bits: a group far from 0 keeps more of its range). float16
      is for activations well inside its range: values are clipped to
      +-65504 (``max_abs``), never stored as inf or nan.
    residual: full-precision window of the most recent tokens per sequence;
      a multiple of page_size (KIVI's residual).
    levels: non-uniform levels (a minimum-as-zero spec only): ``2**bits``
      increasing fractions of the group's range in [0, 1]; a code ``c``
      decodes to ``min + levels[c] * (max - min)`` and a value encodes to its
      nearest level. Uniform levels are ``c / (2**bits - 1)``; levels pulled
      in from the ends (e.g. ``NUQ2_LEVELS = (0.13, 0.39, 0.61, 0.87)`` at 2
      bits, close to Lloyd-Max for a bell-shaped group) are denser where most
      values sit and even lower the worst-case error (0.39 of a step instead
      of 0.5: uniform levels spend two on the extremes); KVQuant's
      non-uniform datatypes. Default None: uniform.
    sink: the first ``sink`` tokens of every sequence are also kept in full
      precision (at most page_size): the attention sink (StreamingLLM), which
      takes much of every query's attention, so its quantization error reaches
      every token (KVQuant keeps it in fp16). A per-sequence cost, like the window.

  >>> QuantSpec(bits=4, axis="channel", symmetric=False, scale_dtype="log8").is_quantized
  True
  >>> QuantSpec().is_quantized
  False
  """

  bits: int = 16
  kind: str = "int"
  symmetric: bool = True
  axis: str = "token"
  group_size: Optional[int] = None
  scale_dtype: str = "bfloat16"
  residual: int = 0
  zero_dtype: str = "int8"
  sink: int = 0
  levels: Optional[tuple] = None

  def __post_init__(self):
    if self.bits not in BITS:
      raise ValueError(f"QuantSpec.bits must be one of {BITS}, got {self.bits!r}")
    if self.kind not in KINDS:
      raise ValueError(f"QuantSpec.kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "fp8" and (self.bits != 8 or not self.symmetric):
      raise ValueError(f"QuantSpec(kind='fp8') needs bits=8 and symmetric=True, got "
                       f"bits={self.bits}, symmetric={self.symmetric}")
    if self.axis not in AXES:
      raise ValueError(f"QuantSpec.axis must be one of {AXES}, got {self.axis!r}")
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size <= 0):
      raise ValueError(f"QuantSpec.group_size must be a positive int or None, "
                       f"got {self.group_size!r}")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"QuantSpec.scale_dtype must be one of {SCALE_DTYPES}, "
                       f"got {self.scale_dtype!r}")
    if self.zero_dtype not in ZERO_DTYPES:
      raise ValueError(f"QuantSpec.zero_dtype must be one of {ZERO_DTYPES}, "
                       f"got {self.zero_dtype!r}")
    if self.zero_dtype != "int8" and not (self.bits < 16 and self.kind == "int"
                                          and not self.symmetric):
      raise ValueError(f"QuantSpec.zero_dtype={self.zero_dtype!r} needs an asymmetric integer "
                       f"spec (bits < 16, kind='int', symmetric=False), got bits={self.bits}, "
                       f"kind={self.kind!r}, symmetric={self.symmetric}")
    if not isinstance(self.residual, int) or self.residual < 0:
      raise ValueError(f"QuantSpec.residual must be an int >= 0, got {self.residual!r}")
    if self.bits == 16 and self.residual:
      raise ValueError(f"QuantSpec(bits=16) keeps everything in full precision; "
                       f"residual must be 0, got {self.residual}")
    if self.levels is not None:
      self._check_levels()
    if not isinstance(self.sink, int) or self.sink < 0:
      raise ValueError(f"QuantSpec.sink must be an int >= 0, got {self.sink!r}")
    if self.bits == 16 and self.sink:
      raise ValueError(f"QuantSpec(bits=16) keeps everything in full precision; "
                       f"sink must be 0, got {self.sink}")

  def _check_levels(self) -> None:
    lv = self.levels
    if not self.zero_is_min:
      raise ValueError(f"QuantSpec.levels needs a minimum-as-zero spec (symmetric=False, "
                       f"zero_dtype='bfloat16' or 'float16'), got symmetric={self.symmetric}, "
                       f"zero_dtype={self.zero_dtype!r}")
    if (not isinstance(lv, tuple) or len(lv) != 1 << self.bits
        or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in lv)
        or any(b <= a for a, b in zip(lv, lv[1:]))):
      raise ValueError(f"QuantSpec.levels must be a tuple of {1 << self.bits} increasing "
                       f"numbers in [0, 1] (bits={self.bits}), got {lv!r}")

  @property
  def level_codes(self) -> Optional[tuple]:
    """The levels in units of the scale (``levels * (2**bits - 1)``, float32), or None."""
    if self.levels is None:
      return None
    qmax = (1 << self.bits) - 1
    return tuple(float(np.float32(qmax * v)) for v in self.levels)

  def validate_for(self, *, head_dim: int, page_size: int, what: str) -> None:
    """Raise ValueError if this spec cannot store ``[page_size, H, head_dim]`` pages."""
    if not self.is_quantized:
      return
    if head_dim % self.codes_per_byte:
      raise ValueError(f"{what}: head_dim={head_dim} is not a multiple of "
                       f"{self.codes_per_byte} codes per byte (bits={self.bits})")
    g = self.group(head_dim=head_dim, page_size=page_size)
    along, extent = (("head_dim", head_dim) if self.axis == "token"
                     else ("page_size", page_size))
    if extent % g:
      raise ValueError(f"{what}: group_size={g} does not divide {along}={extent} "
                       f"(axis={self.axis!r})")
    if self.residual % page_size:
      raise ValueError(f"{what}: residual={self.residual} is not a multiple of "
                       f"page_size={page_size}")
    if self.sink > page_size:
      raise ValueError(f"{what}: sink={self.sink} tokens must fit in the first page "
                       f"(page_size={page_size})")

  @property
  def is_quantized(self) -> bool:
    return self.bits != 16

  @property
  def codes_per_byte(self) -> int:
    return 1 if self.kind == "fp8" or self.bits >= 8 else 8 // self.bits

  @property
  def has_zero(self) -> bool:
    return self.is_quantized and not self.symmetric

  def group(self, *, head_dim: int, page_size: int) -> int:
    """The group size in effect: channels ("token") or tokens ("channel")."""
    if self.group_size is not None:
      return self.group_size
    return head_dim if self.axis == "token" else page_size

  @property
  def scale_bytes(self) -> int:
    return 1 if self.scale_dtype == "log8" else 2

  @property
  def zero_is_min(self) -> bool:
    """Whether the stored zero is the group's minimum (bf16 or f16), not int8 scale units."""
    return self.has_zero and self.zero_dtype != "int8"

  @property
  def zero_bytes(self) -> int:
    """Bytes of one group's zero point (0 for symmetric specs)."""
    if not self.has_zero:
      return 0
    return 1 if self.zero_dtype == "int8" else 2


