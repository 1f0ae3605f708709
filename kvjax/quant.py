"""Quantization specs for stored K/V pages.

Placeholder of the foundation: only the unquantized spec exists. The
quantization issue extends this module (fp8/int8/int4/int2, groups, windows).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one of K or V is stored. ``bits=16`` means unquantized (the config dtype)."""

  bits: int = 16

  def validate_for(self, *, head_dim: int, page_size: int, what: str) -> None:
    del head_dim, page_size
    if self.bits != 16:
      raise ValueError(f"{what}: QuantSpec(bits={self.bits}) is not supported yet; use bits=16")

  @property
  def is_quantized(self) -> bool:
    return self.bits != 16
