"""``TierConfig``: the L2 tier's static configuration (capacity, storage spec, thresholds).

>>> TierConfig(l2_pages=8).l2_key_quant.bits
8
"""

from __future__ import annotations

import dataclasses

from kvjax.layout.presets import PRESETS
from kvjax.layout.spec import QuantSpec
from kvjax.pressure import PressureConfig


@dataclasses.dataclass(frozen=True)
class TierConfig:
  """The L2 tier: a second page pool that L1's cached pages are demoted to.

  Args:
    l2_pages: pages of L2 (> 0).
    l2_preset: a ``kvjax.layout.presets.PRESETS`` name for L2's (key, value) specs;
      default "int8" (the seed's L2); "bf16" stores pages unquantized (bit-exact
      round trip L1 -> L2 -> L1 for an unquantized L1).
    eviction: L2's eviction policy name; only "lru" for now.
    thresholds: L2 pressure thresholds (fractions of ``l2_pages`` holding a page):
      medium, high, critical; increasing (the seed's 60 / 80 / 90 %).
    targets: occupancy ``kvjax.tiers.relieve`` evicts L2 down to at each level (each at
      most its threshold), in batches of ``batch`` pages (``l2_pressure``).
    mesh_axis: the mesh axis L2's page axis is sharded over (``kvjax.tiers.placement``).
  """

  l2_pages: int
  l2_preset: str = "int8"
  eviction: str = "lru"
  thresholds: tuple = (0.60, 0.80, 0.90)
  targets: tuple = (0.55, 0.70, 0.80)
  batch: int = 8
  mesh_axis: str = "pages"

  def __post_init__(self):
    if not isinstance(self.l2_pages, int) or self.l2_pages <= 0:
      raise ValueError(f"TierConfig.l2_pages must be a positive int, got {self.l2_pages!r}")
    if self.l2_preset not in PRESETS:
      raise ValueError(f"TierConfig.l2_preset must be one of {sorted(PRESETS)}, got "
                       f"{self.l2_preset!r}")
    if self.eviction != "lru":
      raise ValueError(f"TierConfig.eviction must be 'lru', got {self.eviction!r}")
    t = tuple(self.thresholds)
    if len(t) != 3 or not all(0 <= a < b <= 1 for a, b in zip((0,) + t[:2], t)):
      raise ValueError(f"TierConfig.thresholds must be 3 increasing fractions in (0, 1], got "
                       f"{self.thresholds!r}")
    g = tuple(self.targets)
    if len(g) != 3 or not all(0 <= y <= x for x, y in zip(t, g)):
      raise ValueError(f"TierConfig.targets must be 3 fractions each at most its threshold "
                       f"{t!r}, got {self.targets!r}")
    if not isinstance(self.batch, int) or self.batch <= 0:
      raise ValueError(f"TierConfig.batch must be a positive int, got {self.batch!r}")
    k, v = PRESETS[self.l2_preset]
    if k.residual or v.residual or k.sink or v.sink:
      raise ValueError(f"TierConfig.l2_preset {self.l2_preset!r}: L2 stores whole pages, no "
                       f"residual window or sink")

  @property
  def l2_pressure(self) -> PressureConfig:
    """L2's ``PressureConfig`` (no requantization: an L2 pool holds one spec)."""
    return PressureConfig(thresholds=tuple(self.thresholds), targets=tuple(self.targets),
                          batch=self.batch, requantize_from=4)

  @property
  def l2_key_quant(self) -> QuantSpec:
    return PRESETS[self.l2_preset][0]

  @property
  def l2_value_quant(self) -> QuantSpec:
    return PRESETS[self.l2_preset][1]
