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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kvjax.cache.checks import check_state
from kvjax.cache.pool import reclaim
from kvjax.cache.pool import victims
from kvjax.cache.status import enforce_checked
from kvjax.cache.status import jit_when_eager
from kvjax.layout.pages import Pages
from kvjax.layout.pages import pool_only
from kvjax.quant.pages import requantize


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


# ----------------------------------------------------------------------------- in the cache


def max_evict(total: int, config: PressureConfig = DEVICE) -> int:
  """Host side: the most pages ``evict_ahead`` can ask for in a pool of ``total`` pages.

  The static bound of ``relieve``'s victim list (its ``limit`` default).

  >>> max_evict(100)
  24
  """
  total = int(total)
  if total <= 0:
    raise ValueError(f"total must be a positive number of pages, got {total}")
  with jax.ensure_compile_time_eval():  # concrete even when called while tracing
    return int(jnp.max(evict_ahead(jnp.arange(total + 1), total, config)))


class Relief(NamedTuple):
  """What ``relieve`` did (E = its static ``limit``)."""

  level: jax.Array       # int32 []  pressure level before relief (0 low .. 3 critical)
  after: jax.Array       # int32 []  pressure level after relief
  evicted: jax.Array     # int32 []  pages evicted as victims (their cached children, which
  #                        can no longer be matched, are freed too and counted in ``freed``)
  freed: jax.Array       # int32 []  pages that became free
  pages: jax.Array       # int32 [E]  the victims' page ids, -1 padded
  block_hash: jax.Array  # uint32 [E, 2]  their block hashes (what a lower tier would key on)
  tokens: jax.Array      # int32 [E, S]  their token ids
  k: Optional[Pages]     # the victims' K of every layer, [L, E, S, H, *] in ``demote_to``'s
  #                        key spec, when demoting; else None
  v: Optional[Pages]     # likewise V


def occupancy(state) -> jax.Array:
  """int32 []: pages holding data (held by a sequence, or cached for prefix reuse).

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=4)
  >>> int(occupancy(kvjax.init(cfg)))
  0
  """
  meta = state.meta
  cached = jnp.any(meta.block_hash != 0, axis=-1)
  return jnp.sum((meta.ref_count > 0) | cached).astype(jnp.int32)


@jit_when_eager("config", "pressure", "demote_to", "limit")
def relieve(state, *, config, pressure: PressureConfig = DEVICE, demote_to=None,
            limit: Optional[int] = None):
  """Evict cached pages ahead of need, in batches, when the pool is under pressure.

  At ``low`` nothing happens. Otherwise ``evict_ahead`` pages are chosen by the cache's
  eviction policy (``config.eviction``, the same scores ``plan_step`` evicts by) among
  pages no live sequence holds, leave the prefix index (with their cached children, as
  on any eviction) and become free, so the next ``plan_step``s allocate without evicting.
  At a level of at least ``pressure.requantize_from`` with ``demote_to`` given, the
  victims' K/V are also returned requantized to the stronger spec, for a lower tier to
  keep (``Relief.k``/``.v``, with their block hashes and tokens); below that level the
  payload is all zeros and ``Relief.pages`` says which pages were evicted. Jittable;
  ``config``, ``pressure``, ``demote_to`` and ``limit`` are static. The state is checked
  against ``config``; with ``config.checked`` an eager call raises ``CacheStatusError``
  if a status flag is set.

  Args:
    state: the cache (``kvjax.CacheState``).
    config: its ``CacheConfig``.
    pressure: the pool's thresholds, targets and batch.
    demote_to: None, or ``(key_spec, value_spec)`` (``kvjax.QuantSpec``s) to requantize
      victims to.
    limit: static most victims per call (default ``max_evict(config.num_pages, pressure)``,
      enough for any level).

  Returns:
    ``(relief, state)``: a ``Relief`` and the cache with the victims freed (stats
    ``evictions`` counts them).

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                         num_pages=8, max_seqs=1, max_pages_per_seq=8)
  >>> st = kvjax.init(cfg)
  >>> _, st = kvjax.plan_step(st, jnp.array([0]), jnp.arange(14)[None], jnp.array([14]),
  ...                         config=cfg)
  >>> st = kvjax.release(st, jnp.array([0]), config=cfg)     # 7 full pages stay cached
  >>> r, st = relieve(st, config=cfg, pressure=PressureConfig(batch=1))
  >>> int(r.level), int(r.freed), int(occupancy(st))        # high (7/8): down to 75 %
  (2, 1, 6)
  """

  check_state(state, config)
  p_ = config.num_pages
  limit = max_evict(p_, pressure) if limit is None else int(limit)
  if limit <= 0 or limit > p_:
    raise ValueError(f"limit must be in [1, num_pages={p_}], got {limit}")
  if demote_to is not None:
    if len(demote_to) != 2:
      raise ValueError(f"demote_to must be (key_spec, value_spec), got {demote_to!r}")
    for what, spec in zip(("key", "value"), demote_to):
      spec.validate_for(head_dim=config.head_dim, page_size=config.page_size,
                        what=f"demote_to {what} spec")
  occupied = occupancy(state)
  lv = level(occupied, p_, pressure)
  want = evict_ahead(occupied, p_, pressure)
  cand, ok = victims(state, limit, clock=state.clock, config=config, cached_only=True)
  take = (jnp.arange(limit) < want) & ok                          # [E] best victims first
  out = reclaim(state, jnp.where(take, cand, p_), clock=state.clock, config=config)
  new_state, block_hash, tokens = out.state, out.block_hash, out.tokens
  n = jnp.sum(take).astype(jnp.int32)
  left = occupancy(new_state)
  k = v = None
  if demote_to is not None:
    keep = take & wants_requantize(lv, pressure)
    safe = jnp.clip(cand, 0, p_ - 1)

    def payload(pages, to_spec):
      pool = pool_only(pages)
      sel = jax.tree.map(lambda a: a[:, safe], pool)               # [L, E, ...]
      out = requantize(sel, pool.spec, to_spec)
      mask = lambda a: None if a is None else jnp.where(  # noqa: E731
          keep.reshape((1, -1) + (1,) * (a.ndim - 2)), a, jnp.zeros((), a.dtype))
      return out.replace(data=mask(out.data), scale=mask(out.scale), zero=mask(out.zero))

    k, v = payload(state.k, demote_to[0]), payload(state.v, demote_to[1])
  relief = Relief(level=lv, after=level(left, p_, pressure), evicted=n, freed=occupied - left,
                  pages=jnp.where(take, cand, -1), block_hash=block_hash, tokens=tokens, k=k,
                  v=v)
  return relief, enforce_checked(new_state, config)
