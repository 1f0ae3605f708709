"""Memory-pressure levels of a page pool and how many pages to free ahead of need.

Pure functions of occupancy, so they run inside jit next to ``score_and_evict``:

* ``level(occupied, total, config) -> int32``: 0 low, 1 medium, 2 high, 3 critical, by
  occupancy thresholds (device pages: 70 / 85 / 95 %; a host tier might use 60 / 80 / 90 %).
* ``evict_ahead(occupied, total, config) -> int32``: pages to evict now so that occupancy
  falls back to the level's target (none at ``low``), in whole batches.
* ``wants_requantize(level, config) -> bool``: whether colder pages should move to a
  stronger quantization spec (when a tier has one) at this level.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOW, MEDIUM, HIGH, CRITICAL = 0, 1, 2, 3
LEVEL_NAMES = ("low", "medium", "high", "critical")


@dataclasses.dataclass(frozen=True)
class PressureConfig:
  """Thresholds and targets of one pool (static, hashable).

  Args:
    thresholds: occupancy fractions at which medium, high and critical begin (increasing,
      in (0, 1]).
    targets: occupancy to evict down to at medium, high and critical (each at most its
      level's threshold).
    batch: pages are evicted in multiples of this (amortizes one ``score_and_evict``).
    requantize_from: lowest level at which colder pages are requantized (4 = never).

  >>> PressureConfig().thresholds
  (0.7, 0.85, 0.95)
  """

  thresholds: tuple = (0.70, 0.85, 0.95)
  targets: tuple = (0.65, 0.75, 0.85)
  batch: int = 8
  requantize_from: int = HIGH

  def __post_init__(self):
    t, g = tuple(self.thresholds), tuple(self.targets)
    if len(t) != 3 or not all(0.0 < x <= 1.0 for x in t) or not t[0] < t[1] < t[2]:
      raise ValueError(f"thresholds must be 3 increasing fractions in (0, 1], got {t!r}")
    if len(g) != 3 or not all(0.0 <= y <= x for x, y in zip(t, g)):
      raise ValueError(f"targets must be 3 fractions each at most its threshold {t!r}, got {g!r}")
    if not isinstance(self.batch, int) or self.batch <= 0:
      raise ValueError(f"batch must be a positive int, got {self.batch!r}")
    if self.requantize_from not in (LOW, MEDIUM, HIGH, CRITICAL, 4):
      raise ValueError(f"requantize_from must be a level 0..3 or 4 (never), got "
                       f"{self.requantize_from!r}")


DEVICE = PressureConfig()
HOST = PressureConfig(thresholds=(0.60, 0.80, 0.90), targets=(0.55, 0.70, 0.80))


def level(occupied, total, config: PressureConfig = DEVICE) -> jax.Array:
  """int32 [...]: pressure level of a pool with ``occupied`` of ``total`` pages in use.

  Args:
    occupied: int [...]  pages holding data (cached or referenced).
    total: int [...]  pages in the pool (> 0).
    config: thresholds (static).

  >>> [int(level(n, 100)) for n in (69, 70, 85, 95, 100)]
  [0, 1, 2, 3, 3]
  """
  frac = jnp.asarray(occupied, jnp.float32) / jnp.maximum(jnp.asarray(total, jnp.float32), 1.0)
  # a small tolerance so that e.g. 85 of 100 pages reads as 0.85 despite float rounding
  t = jnp.asarray(config.thresholds, jnp.float32) - 1e-6
  return jnp.sum(frac[..., None] >= t, axis=-1).astype(jnp.int32)


def evict_ahead(occupied, total, config: PressureConfig = DEVICE) -> jax.Array:
  """int32 []: pages to evict now (a multiple of ``config.batch``, at most ``occupied``).

  At ``low`` nothing; otherwise enough to bring occupancy down to the level's target.

  >>> int(evict_ahead(80, 100))   # medium: down to 65 %, in batches of 8
  16
  >>> int(evict_ahead(60, 100))
  0
  """
  lv = level(occupied, total, config)
  targets = jnp.asarray((1.0,) + tuple(config.targets), jnp.float32)
  total_f = jnp.asarray(total, jnp.float32)
  keep = jnp.floor(targets[lv] * total_f + 1e-4).astype(jnp.int32)
  need = jnp.maximum(jnp.asarray(occupied, jnp.int32) - keep, 0)
  batches = (need + config.batch - 1) // config.batch
  return jnp.minimum(batches * config.batch, jnp.asarray(occupied, jnp.int32))


def wants_requantize(lv, config: PressureConfig = DEVICE) -> jax.Array:
  """bool []: at level ``lv``, colder pages should be requantized to a stronger spec.

  >>> bool(wants_requantize(HIGH)), bool(wants_requantize(MEDIUM))
  (True, False)
  """
  return jnp.asarray(lv) >= config.requantize_from


def level_name(lv) -> str:
  """Host side: ``"low"`` ... ``"critical"``."""
  return LEVEL_NAMES[int(lv)]
