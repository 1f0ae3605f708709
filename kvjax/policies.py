"""Eviction policies as pure scoring functions over page metadata.

A policy is a ``Policy`` bundle of pure functions (optax-style; configuration in the
closure, arrays in the state):

* ``init(num_pages) -> state``: the policy's own history (a small pytree; ``()`` if none).
* ``score(meta, state, clock, params) -> float32[P]``: higher = evict first; pages with
  ``ref_count > 0`` score ``-inf`` (never candidates), empty pages ``+inf``.
* ``update(state, meta, access, params) -> state``: after each reference (``Access``).
* ``admit(state, meta, access, victim, params) -> bool[]`` or None: may a missing block
  take the victim's page? (None = always.) A declined block bypasses the cache.

The same functions run in the real cache and in ``kvjax.sim``. ``params`` is a dict of
float32 scalars (so ``vmap`` can sweep them); ``make_params`` validates it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from kvjax.evict import AGE_CAP, CLASS_STEP, NEVER, Access, age, bucket, finalize, key_hash
from kvjax.evict import Deferred, deferred, get, live_pages, page_size_of, put, same_key
from kvjax.evict import settle_all, top_victims, view
from kvjax.state import PageMeta


class Policy(NamedTuple):
  """An eviction (and optional admission) policy: pure functions plus parameter specs."""

  name: str
  init: Callable[[int], Any]
  score: Callable[..., jax.Array]
  update: Callable[..., Any]
  admit: Optional[Callable[..., jax.Array]]
  defaults: dict          # {param: float default}
  bounds: dict            # {param: (low, high, low_open, high_open)}
  oracle: bool = False    # needs ``Access.next_use`` (simulator only)


def _no_state(num_pages: int):
  del num_pages
  return ()


def _no_update(state, meta, access, params):
  del meta, access, params
  return state


# ---------------------------------------------------------------------------- LRU, FIFO


def lru_score(meta: PageMeta, clock: jax.Array, params=None) -> jax.Array:
  """LRU: the page unused the longest goes first.

  Args:
    meta: page metadata ([P] fields).
    clock: int32 [] current logical time.
    params: unused.

  Returns:
    float32 [P] scores (higher = evict first).

  >>> from kvjax.state import init_meta
  >>> m = init_meta(3, 1).replace(filled=jnp.ones(3, jnp.int32), last_access=jnp.array([5, 2, 7]))
  >>> int(jnp.argmax(lru_score(m, jnp.int32(9))))
  1
  """
  del params
  return finalize(age(meta, clock), meta)


class FifoState(NamedTuple):
  inserted: Deferred  # int32 [P]  clock at which the page was filled


def _fifo_init(num_pages: int) -> FifoState:
  return FifoState(inserted=deferred(jnp.zeros((num_pages,), jnp.int32), 1))


def _fifo_score(meta, state: FifoState, clock, params):
  del params
  return finalize(jnp.clip(clock - view(state.inserted), 0, AGE_CAP).astype(jnp.float32), meta)


def _fifo_update(state: FifoState, meta, access: Access, params):
  del meta, params
  return FifoState(put(state.inserted, access.slot, access.clock, access.inserted))


# ---------------------------------------------------------------------------- LRU-2


class Lru2State(NamedTuple):
  last: Deferred  # int32 [P]  clock of the page's last access
  prev: Deferred  # int32 [P]  clock of the access before it (-1 = only one so far)


def _lru2_init(num_pages: int) -> Lru2State:
  z = jnp.zeros((num_pages,), jnp.int32)
  return Lru2State(last=deferred(z, 1), prev=deferred(z - 1, 1))


def _lru2_score(meta, state: Lru2State, clock, params):
  """LRU-K with K = 2: largest backward 2-distance first; pages seen once go before any
  page seen twice (infinite 2-distance), in LRU order among themselves."""
  del params
  prev = view(state.prev)
  d2 = jnp.clip(clock - prev, 0, AGE_CAP).astype(jnp.float32)
  d1 = jnp.clip(clock - view(state.last), 0, AGE_CAP).astype(jnp.float32)
  return finalize(jnp.where(prev < 0, CLASS_STEP + d1, d2), meta)


def _lru2_update(state: Lru2State, meta, access: Access, params):
  del meta, params
  s = jnp.maximum(access.slot, 0)
  touched = access.hit | access.inserted
  prev = put(state.prev, access.slot, jnp.where(access.hit, get(state.last, s), -1), touched)
  return Lru2State(last=put(state.last, access.slot, access.clock, touched), prev=prev)


# ---------------------------------------------------------------------------- LFU (aged)


class LfuState(NamedTuple):
  freq: Deferred   # float32 [P]  aged access count, as of ``stamp``
  stamp: Deferred  # int32 [P]  clock at which ``freq`` was last brought up to date


def lfu_state(freq: jax.Array, stamp: jax.Array) -> LfuState:
  """An ``LfuState`` from float32 [P] counts and int32 [P] stamps."""
  return LfuState(deferred(jnp.asarray(freq, jnp.float32), 1),
                  deferred(jnp.asarray(stamp, jnp.int32), 1))


def _lfu_init(num_pages: int) -> LfuState:
  return lfu_state(jnp.zeros((num_pages,)), jnp.zeros((num_pages,)))


def _lfu_log_freq(state: LfuState, clock, half_life):
  """float32 [P] log2 of each page's aged frequency at ``clock``."""
  elapsed = jnp.clip(clock - view(state.stamp), 0, AGE_CAP).astype(jnp.float32)
  return jnp.log2(jnp.maximum(view(state.freq), 1e-30)) - elapsed / half_life


def _lfu_score(meta, state: LfuState, clock, params):
  """LFU with exponential aging: counts halve every ``half_life`` steps; lowest first."""
  return finalize(-_lfu_log_freq(state, clock, params["half_life"]), meta)


def _lfu_update(state: LfuState, meta, access: Access, params):
  del meta
  s = jnp.maximum(access.slot, 0)
  elapsed = (access.clock - get(state.stamp, s)).astype(jnp.float32)
  bumped = get(state.freq, s) * jnp.exp2(-elapsed / params["half_life"]) + 1.0
  touched = access.hit | access.inserted
  return LfuState(freq=put(state.freq, access.slot, jnp.where(access.hit, bumped, 1.0), touched),
                  stamp=put(state.stamp, access.slot, access.clock, touched))


# ---------------------------------------------------------------------------- S3-FIFO


class S3FifoState(NamedTuple):
  in_main: Deferred  # bool [P]  page is in the main queue (else in the small probation queue)
  ghost: Deferred    # uint32 [P, 2]  hashed table of keys recently evicted from probation


def s3fifo_state(in_main: jax.Array, ghost: Optional[jax.Array] = None) -> S3FifoState:
  """An ``S3FifoState`` from bool [P] queue flags (and a uint32 [P, 2] ghost table)."""
  in_main = jnp.asarray(in_main, bool)
  ghost = jnp.zeros((in_main.shape[0], 2), jnp.uint32) if ghost is None else ghost
  return S3FifoState(deferred(in_main, 1), deferred(jnp.asarray(ghost, jnp.uint32), 2))


def _s3fifo_init(num_pages: int) -> S3FifoState:
  return s3fifo_state(jnp.zeros((num_pages,), bool))


def _s3fifo_score(meta, state: S3FifoState, clock, params):
  """S3-FIFO-style: new blocks enter a small probation FIFO (``small_frac`` of the pool);
  a hit there promotes to main; a probation block evicted unseen leaves its key in a
  ghost table, and a ghost hit enters main directly. Main is kept in LRU order (CLOCK's
  limit). Partial pages (``filled < page_size``) are scored ``partial_bias`` classes
  nearer eviction within probation."""
  in_main = view(state.in_main)
  cap = live_pages(meta).astype(jnp.float32)
  small = ~in_main & (meta.filled > 0) & (meta.ref_count == 0)
  from_small = jnp.sum(small).astype(jnp.float32) >= params["small_frac"] * cap
  a = age(meta, clock)
  partial = (meta.filled < page_size_of(meta)) & ~in_main
  a = a + params["partial_bias"] * jnp.where(partial, float(AGE_CAP), 0.0)
  eligible = (~in_main) == from_small
  return finalize(jnp.where(eligible, a, a - CLASS_STEP), meta)


def _s3fifo_update(state: S3FifoState, meta, access: Access, params):
  del params
  g = live_pages(meta)
  s = jnp.maximum(access.slot, 0)
  ev_small = access.evicted & ~get(state.in_main, s)
  ghost = put(state.ghost, bucket(access.evicted_key, g), access.evicted_key, ev_small)
  b = bucket(access.key, g)
  ghost_hit = access.inserted & same_key(access.key, get(ghost, b))
  ghost = put(ghost, b, jnp.zeros((2,), jnp.uint32), ghost_hit)
  in_main = put(state.in_main, access.slot, access.hit | ghost_hit,
                access.hit | access.inserted)
  return S3FifoState(in_main=in_main, ghost=ghost)


# ---------------------------------------------------------------------------- weighted


def weighted_score(meta: PageMeta, clock: jax.Array, params: dict) -> jax.Array:
  """Multi-factor weighted score (temporal, frequency, size, recompute cost, context).

  ``w_age * age / age_scale - w_freq * log2(1 + access_count) - w_size * filled / page_size
  - w_cost * log2(1 + position) - w_context * log2(1 + children)``, where ``children`` is
  the number of pages whose ``parent`` is the page (evicting a shared prefix strands them).

  >>> from kvjax.state import init_meta
  >>> m = init_meta(2, 4).replace(filled=jnp.array([4, 4]), access_count=jnp.array([1, 9]))
  >>> p = make_params("weighted", w_age=0.0)
  >>> int(jnp.argmax(weighted_score(m, jnp.int32(0), p)))
  0
  """
  t = age(meta, clock) / params["age_scale"]
  f = jnp.log2(1.0 + meta.access_count.astype(jnp.float32))
  s = meta.filled.astype(jnp.float32) / page_size_of(meta)
  c = jnp.log2(1.0 + meta.position.astype(jnp.float32))
  p = meta.parent

  def children():  # a scatter-add over the pool: skipped when its weight is zero
    return jnp.zeros(p.shape, jnp.float32).at[jnp.where(p >= 0, p, p.shape[0])].add(
        1.0, mode="drop")

  x = jnp.log2(1.0 + jax.lax.cond(params["w_context"] > 0, children,
                                   lambda: jnp.zeros(p.shape, jnp.float32)))
  raw = (params["w_age"] * t - params["w_freq"] * f - params["w_size"] * s
         - params["w_cost"] * c - params["w_context"] * x)
  return finalize(raw, meta)


# ---------------------------------------------------------------------------- GreedyDual


class GreedyDualState(NamedTuple):
  credit: Deferred      # float32 [P]  H value: inflation at last access + the page's cost
  inflation: jax.Array  # float32 []  L: the H value of the last evicted page


def greedydual_state(credit: jax.Array, inflation=0.0) -> GreedyDualState:
  """A ``GreedyDualState`` from float32 [P] credits."""
  return GreedyDualState(deferred(jnp.asarray(credit, jnp.float32), 1),
                         jnp.asarray(inflation, jnp.float32))


def _gd_init(num_pages: int) -> GreedyDualState:
  return greedydual_state(jnp.zeros((num_pages,)))


def recompute_cost(filled, position, page_size: int, pos_weight) -> jax.Array:
  """float32 cost of recomputing a page: its tokens, times ``1 + pos_weight * position``
  (attention over the prefix makes later blocks dearer)."""
  return (filled.astype(jnp.float32) / page_size) * (
      1.0 + pos_weight * position.astype(jnp.float32))


def _gd_score(meta, state: GreedyDualState, clock, params):
  """GreedyDual-Size-Frequency: lowest credit ``L + cost * count**freq_exp`` first."""
  del clock, params
  return finalize(-view(state.credit), meta)


def _gd_update(state: GreedyDualState, meta, access: Access, params):
  s = jnp.maximum(access.slot, 0)
  inflation = jnp.where(access.evicted, jnp.maximum(state.inflation, get(state.credit, s)),
                        state.inflation)
  cost = recompute_cost(access.filled, access.position, page_size_of(meta), params["pos_weight"])
  count = meta.access_count[s].astype(jnp.float32)
  credit = put(state.credit, access.slot,
               inflation + cost * jnp.maximum(count, 1.0) ** params["freq_exp"],
               access.hit | access.inserted)
  return GreedyDualState(credit=credit, inflation=inflation)


# ---------------------------------------------------------------------------- LeCaR


class LecarState(NamedTuple):
  weights: jax.Array    # float32 [2]  expert weights (LRU, LFU), summing to 1
  lfu: LfuState         # aged frequencies for the LFU expert
  hist_key: Deferred    # uint32 [P, 2]  hashed table of evicted keys
  hist_time: Deferred   # int32 [P]  clock of that eviction
  hist_lfu: Deferred    # bool [P]  the LFU expert chose it (else LRU)


def _lecar_init(num_pages: int) -> LecarState:
  return LecarState(weights=jnp.full((2,), 0.5, jnp.float32), lfu=_lfu_init(num_pages),
                    hist_key=deferred(jnp.zeros((num_pages, 2), jnp.uint32), 2),
                    hist_time=deferred(jnp.zeros((num_pages,), jnp.int32), 1),
                    hist_lfu=deferred(jnp.zeros((num_pages,), bool), 1))


def _lecar_score(meta, state: LecarState, clock, params):
  """LeCaR-style: follow whichever expert (LRU or aged LFU) has the larger weight; an
  expert whose victim comes back while still in the history loses weight (regret decays
  with ``regret_half_life``)."""
  lfu = -_lfu_log_freq(state.lfu, clock, params["half_life"])
  return finalize(jnp.where(state.weights[1] > state.weights[0], lfu, age(meta, clock)), meta)


def _lecar_update(state: LecarState, meta, access: Access, params):
  g = live_pages(meta)
  chose_lfu = state.weights[1] > state.weights[0]
  b = bucket(access.key, g)
  regret_hit = ~access.hit & same_key(access.key, get(state.hist_key, b))
  elapsed = (access.clock - get(state.hist_time, b)).astype(jnp.float32)
  regret = jnp.exp2(-elapsed / params["regret_half_life"])
  penalty = jnp.exp(-params["learning_rate"] * regret)
  blamed = jnp.where(get(state.hist_lfu, b), jnp.array([1.0, penalty]),
                     jnp.array([penalty, 1.0]))
  w = state.weights * jnp.where(regret_hit, blamed, 1.0)
  w = jnp.clip(w / jnp.sum(w), 0.01, 0.99)
  w = w / jnp.sum(w)
  hist_key = put(state.hist_key, b, jnp.zeros((2,), jnp.uint32), regret_hit)
  eb = bucket(access.evicted_key, g)
  hist_key = put(hist_key, eb, access.evicted_key, access.evicted)
  hist_time = put(state.hist_time, eb, access.clock, access.evicted)
  hist_lfu = put(state.hist_lfu, eb, chose_lfu, access.evicted)
  return LecarState(weights=w, lfu=_lfu_update(state.lfu, meta, access, params),
                    hist_key=hist_key, hist_time=hist_time, hist_lfu=hist_lfu)


# ---------------------------------------------------------------------------- oracle (MIN)


class MinState(NamedTuple):
  next_use: Deferred  # int32 [P]  clock of the cached block's next reference (NEVER = none)


def min_state(next_use: jax.Array) -> MinState:
  """A ``MinState`` from int32 [P] next-use times."""
  return MinState(deferred(jnp.asarray(next_use, jnp.int32), 1))


def _min_init(num_pages: int) -> MinState:
  return min_state(jnp.full((num_pages,), NEVER, jnp.int32))


def _min_score(meta, state: MinState, clock, params):
  """Belady's MIN: the block referenced farthest in the future goes first (oracle)."""
  del clock, params
  return finalize(view(state.next_use).astype(jnp.float32), meta)


def _min_update(state: MinState, meta, access: Access, params):
  del meta, params
  return MinState(put(state.next_use, access.slot, access.next_use,
                      access.hit | access.inserted))


def _min_admit(state: MinState, meta, access: Access, victim, params):
  """MIN with bypass: a block whose next use is no earlier than the victim's is not cached."""
  del params
  return (meta.filled[victim] == 0) | (access.next_use < get(state.next_use, victim))


# ---------------------------------------------------------------------------- TinyLFU admission

_SKETCH_ROWS = 4
_SKETCH_MAX = 15


class TinyLfuState(NamedTuple):
  inner: Any            # the wrapped eviction policy's state
  counts: Deferred      # int32 [4 * P]  count-min sketch, row-major (counters capped at 15)
  epoch: Deferred       # int32 [4 * P]  sketch epoch each counter was last aged to
  now: jax.Array        # int32 []  current sketch epoch (counters halve once per epoch)
  adds: jax.Array       # int32 []  increments since the epoch began


def _sketch_cells(key, meta):
  """int32 [4]: flat cells of ``key`` (one per row; row width = live pages)."""
  width = live_pages(meta)
  p = meta.filled.shape[0]
  return jnp.stack([r * p + bucket(key, width, seed=r + 1) for r in range(_SKETCH_ROWS)])


def _sketch_estimate(state: TinyLfuState, meta, key):
  """int32 []: count-min estimate of ``key``'s recent frequency (lazily halved by epoch)."""
  est = jnp.int32(_SKETCH_MAX)
  for c in _sketch_cells(key, meta):
    shift = jnp.minimum(state.now - get(state.epoch, c), 31)
    est = jnp.minimum(est, get(state.counts, c) >> shift)
  return est


def with_tinylfu(inner: Policy, name: Optional[str] = None) -> Policy:
  """Wrap ``inner`` with a TinyLFU admission filter.

  A missing block takes the victim's page only if the frequency sketch, counting this
  reference, has seen it more often than the victim (empty pages are always taken);
  otherwise it bypasses the cache. Counters halve every ``sample_factor * num_pages``
  references. A partial block (``filled < page_size``) must beat the victim by
  ``partial_margin`` more.

  >>> p = with_tinylfu(POLICIES["lru"])
  >>> p.name
  'tinylfu-lru'
  """

  def init(num_pages):
    z = jnp.zeros((_SKETCH_ROWS * num_pages,), jnp.int32)
    return TinyLfuState(inner.init(num_pages), deferred(z, _SKETCH_ROWS),
                        deferred(z, _SKETCH_ROWS), jnp.zeros((), jnp.int32),
                        jnp.zeros((), jnp.int32))

  def score(meta, state, clock, params):
    return inner.score(meta, state.inner, clock, params)

  def update(state, meta, access, params):
    state = settle_all(state)
    real = (access.key[0] != 0) | (access.key[1] != 0)  # (0, 0): no block referenced
    counts, epoch = state.counts, state.epoch
    for c in _sketch_cells(access.key, meta):
      shift = jnp.minimum(state.now - get(state.epoch, c), 31)
      counts = put(counts, c, jnp.minimum((get(state.counts, c) >> shift) + 1, _SKETCH_MAX),
                   real)
      epoch = put(epoch, c, state.now, real)
    period = (params["sample_factor"] * live_pages(meta)).astype(jnp.int32)
    adds = state.adds + real.astype(jnp.int32)
    roll = adds >= jnp.maximum(period, 1)
    return TinyLfuState(inner.update(state.inner, meta, access, params), counts, epoch,
                        state.now + roll.astype(jnp.int32), jnp.where(roll, 0, adds))

  def admit(state, meta, access, victim, params):
    ok = inner.admit(state.inner, meta, access, victim, params) if inner.admit else True
    # the sketch counts the current reference in ``update``, after admission: add it here
    cand = _sketch_estimate(state, meta, access.key).astype(jnp.float32) + 1.0
    held = _sketch_estimate(state, meta, meta.block_hash[victim]).astype(jnp.float32)
    partial = access.filled < page_size_of(meta)
    need = held + jnp.where(partial, params["partial_margin"], 0.0)
    return ok & ((meta.filled[victim] == 0) | (cand > need))

  bounds = {"sample_factor": (0.0, 1e6, True, False), "partial_margin": (0.0, 16.0, False, False)}
  bounds.update(inner.bounds)
  defaults = {"sample_factor": 10.0, "partial_margin": 0.0}
  defaults.update(inner.defaults)
  return Policy(name or f"tinylfu-{inner.name}", init, score, update, admit, defaults, bounds,
                inner.oracle)


# ---------------------------------------------------------------------------- frequency-credit LRU

GHOST_FACTOR = 16  # retained-count table entries per page (4 lost ~10 % of the gain to collisions)


class FreqLruState(NamedTuple):
  count: Deferred        # int32 [P]  references to the cached block, including ones before
                         #            an earlier eviction (retained in the ghost table)
  ghost_key: Deferred    # uint32 [16P, 2]  hashed table of evicted keys
  ghost_count: Deferred  # int32 [16P]  their reference counts at eviction


def freqlru_state(count: jax.Array) -> FreqLruState:
  """A ``FreqLruState`` from int32 [P] reference counts (empty ghost table)."""
  count = jnp.asarray(count, jnp.int32)
  g = GHOST_FACTOR * count.shape[0]
  return FreqLruState(deferred(count, 1), deferred(jnp.zeros((g, 2), jnp.uint32), 1),
                      deferred(jnp.zeros((g,), jnp.int32), 1))


def _freqlru_init(num_pages: int) -> FreqLruState:
  return freqlru_state(jnp.zeros((num_pages,), jnp.int32))


def _freqlru_score(meta, state: FreqLruState, clock, params):
  """LRU with a frequency credit: a block referenced ``c`` times is treated as if used
  ``credit * log2(c)`` steps later than it was. Counts survive eviction in a ghost table
  (``GHOST_FACTOR * num_pages`` hashed entries), so a block coming back keeps its history. Partial
  pages go first."""
  c = jnp.maximum(view(state.count), 1).astype(jnp.float32)
  raw = age(meta, clock) - params["credit"] * jnp.log2(c)
  partial = meta.filled < page_size_of(meta)
  return finalize(jnp.where(partial, raw + CLASS_STEP, raw), meta)


def _freqlru_update(state: FreqLruState, meta, access: Access, params):
  del params
  g = GHOST_FACTOR * live_pages(meta)
  s = jnp.maximum(access.slot, 0)
  b = bucket(access.key, g)
  known = same_key(access.key, get(state.ghost_key, b))
  retained = jnp.where(known, get(state.ghost_count, b), 0)
  old = get(state.count, s)
  count = jnp.where(access.hit, old + 1, retained + 1)
  eb = bucket(access.evicted_key, g)
  return FreqLruState(
      count=put(state.count, access.slot, count, access.hit | access.inserted),
      ghost_key=put(state.ghost_key, eb, access.evicted_key, access.evicted),
      ghost_count=put(state.ghost_count, eb, old, access.evicted))


def _freqlru_admit(state: FreqLruState, meta, access: Access, victim, params):
  """A partial block (the unfinished last page of a request) does not displace a cached
  block unless ``admit_partial`` is 1."""
  del state
  partial = access.filled < page_size_of(meta)
  return (meta.filled[victim] == 0) | ~partial | (params["admit_partial"] > 0.5)


# ---------------------------------------------------------------------------- auto-tuned freqlru

MINI_CREDITS = (0.0, 2048.0, 8192.0, 24576.0, 65536.0)  # candidate credits (0 = LRU)
MINI_RATE = 8  # one key in MINI_RATE is replayed through the miniature caches


class AutoFreqLruState(NamedTuple):
  main: FreqLruState      # the real pool's state
  mini_key: Deferred      # uint32 [K * m, 2]  miniature caches' blocks (m = P // 8 each)
  mini_last: Deferred     # int32 [K * m]  their last access clocks
  mini_count: Deferred    # int32 [K * m]  their reference counts (0 = empty)
  mini_gkey: Deferred     # uint32 [K * 16m, 2]  miniature ghost tables (keys)
  mini_gcount: Deferred   # int32 [K * 16m]  miniature ghost tables (counts)
  mini_hits: jax.Array    # float32 [K]  exponentially decayed hits of each miniature


def _mini_size(num_pages: int) -> int:
  return max(8, num_pages // MINI_RATE)


def _auto_init(num_pages: int, k: int = len(MINI_CREDITS)) -> AutoFreqLruState:
  m = _mini_size(num_pages)
  return AutoFreqLruState(
      main=_freqlru_init(num_pages),
      mini_key=deferred(jnp.zeros((k * m, 2), jnp.uint32), k),
      mini_last=deferred(jnp.zeros((k * m,), jnp.int32), k),
      mini_count=deferred(jnp.zeros((k * m,), jnp.int32), k),
      mini_gkey=deferred(jnp.zeros((k * GHOST_FACTOR * m, 2), jnp.uint32), k),
      mini_gcount=deferred(jnp.zeros((k * GHOST_FACTOR * m,), jnp.int32), k),
      mini_hits=jnp.zeros((k,), jnp.float32))


def auto_credit(state: AutoFreqLruState, credits=MINI_CREDITS) -> jax.Array:
  """float32 []: the credit (of ``credits``, float [K]) of the miniature cache with the
  most (decayed) hits."""
  return jnp.asarray(credits, jnp.float32)[jnp.argmax(state.mini_hits)]


def _auto_score(meta, state: AutoFreqLruState, clock, params):
  """``freqlru`` whose credit is picked online: one key in 8 (by hash) is also replayed
  through five miniature ``freqlru`` caches of an eighth of the pool (credits
  ``MINI_CREDITS``, 0 being LRU), and the pool follows the miniature with the most
  recent hits (half-life ``window`` pool sizes of sampled references). Spatially
  sampled miniatures track the full cache's hit ratio (Waldspurger et al., ATC'17), so
  the choice follows the traffic and the capacity instead of a fitted constant."""
  return _freqlru_score(meta, state.main, clock, {**params, "credit": auto_credit(state)})


def _auto_update(state: AutoFreqLruState, meta, access: Access, params,
                 main_update=None, credits=MINI_CREDITS):
  k = state.mini_hits.shape[0]
  m = state.mini_last.array.shape[0] // k
  g = GHOST_FACTOR * m
  main = (main_update or _freqlru_update)(state.main, meta, access, params)
  live = live_pages(meta)
  m_eff = jnp.clip(live // MINI_RATE, 1, m)
  sampled = ((access.key[0] != 0) | (access.key[1] != 0)) & (
      key_hash(access.key, seed=11) % jnp.uint32(MINI_RATE) == 0)
  partial = access.filled < page_size_of(meta)
  def replay(state):  # the sampled reference through every miniature cache
    rows = jnp.arange(k)[:, None] * m + jnp.arange(m)[None, :]          # [K, m] flat cells
    keys = view(state.mini_key)[rows]                                     # [K, m, 2]
    last = view(state.mini_last)[rows]
    count = view(state.mini_count)[rows]
    usable = jnp.arange(m)[None, :] < m_eff
    match = same_key(keys, access.key[None, None, :]) & usable
    hit = match.any(axis=1)                                               # [K]
    pos = jnp.argmax(match, axis=1)
    credit = jnp.asarray(credits, jnp.float32)[:, None]
    score = (jnp.clip(access.clock - last, 0, AGE_CAP).astype(jnp.float32)
             - credit * jnp.log2(jnp.maximum(count, 1).astype(jnp.float32)))
    score = jnp.where(count == 0, jnp.inf, score)
    score = jnp.where(usable, score, -jnp.inf)
    victim = jnp.argmax(score, axis=1)
    vcell = jnp.arange(k) * m + victim
    empty = count[jnp.arange(k), victim] == 0
    insert = sampled & ~hit & (~partial | empty)
    gb = jnp.arange(k) * g + bucket(access.key, GHOST_FACTOR * m_eff)
    known = same_key(jax.vmap(lambda c: get(state.mini_gkey, c))(gb), access.key[None, :])
    retained = jnp.where(known, jax.vmap(lambda c: get(state.mini_gcount, c))(gb), 0)
    cell = jnp.where(hit, jnp.arange(k) * m + pos, vcell)
    new_count = jnp.where(hit, count[jnp.arange(k), pos] + 1, retained + 1)
    write = sampled & (hit | insert)
    evicting = insert & ~empty
    ekey = keys[jnp.arange(k), victim]
    eb = jnp.arange(k) * g + bucket(ekey, GHOST_FACTOR * m_eff)
    mk, ml, mc, gk, gc = (state.mini_key, state.mini_last, state.mini_count, state.mini_gkey,
                          state.mini_gcount)
    for j in range(k):
      mk = put(mk, cell[j], access.key, write[j])
      ml = put(ml, cell[j], access.clock, write[j])
      mc = put(mc, cell[j], new_count[j], write[j])
      gk = put(gk, eb[j], ekey[j], evicting[j])
      gc = put(gc, eb[j], count[j, victim[j]], evicting[j])
    decay = jnp.exp2(-1.0 / (params["window"] * jnp.maximum(m_eff, 1).astype(jnp.float32)))
    hits = jnp.where(sampled, state.mini_hits * decay + hit.astype(jnp.float32), state.mini_hits)
    return AutoFreqLruState(main, mk, ml, mc, gk, gc, hits)

  # one reference in MINI_RATE is sampled; the key alone decides, so this stays a branch
  # (not a select) when runs are vmapped over capacities or parameters
  return jax.lax.cond(sampled, replay, lambda st: st._replace(main=main), state)


def _auto_admit(state: AutoFreqLruState, meta, access: Access, victim, params):
  return _freqlru_admit(state.main, meta, access, victim, params)


# ---------------------------------------------------------------------------- class-learned freqlru

REUSE_CLASSES = 16  # first-seen full blocks: 4 parent counts x 2 depths x last full block or not
CLASS_PRIOR = 8.0  # pseudo-references per class before data (reuse rate 1/4; count 2: 2/5)


class ClassFreqState(NamedTuple):
  count: Deferred        # int32 [P]  references to the cached block (ghost-retained, as freqlru)
  last: Deferred         # int32 [P]  clock of its last reference
  gap: Deferred          # int32 [P]  re-reference interval at that reference (0 = first seen)
  klass: Deferred        # int32 [P]  reuse class of that reference (-1 = none, C = count 2)
  ghost_key: Deferred    # uint32 [16P, 2]  hashed table of evicted (or bypassed) keys
  ghost_count: Deferred  # int32 [16P]  their counts
  ghost_last: Deferred   # int32 [16P]  their last reference clocks
  ghost_class: Deferred  # int32 [16P]  their reuse classes
  refs: jax.Array        # float32 [C + 1]  references per reuse class
  reused: jax.Array      # float32 [C + 1]  of those, referenced again later (seen on a hit or ghost)
  prev_slot: jax.Array   # int32 []  page of the previous reference (-1 = not cached)
  prev_pos: jax.Array    # int32 []  its position
  prev_count: jax.Array  # int32 []  its count


def classfreq_state(count, klass=None, gap=None, last=None, reuse_rate=None) -> ClassFreqState:
  """A ``ClassFreqState`` from int32 [P] counts (and classes, intervals, last clocks; a
  float [C + 1] per-class reuse rate, applied with weight 1000), empty ghost table."""
  count = jnp.asarray(count, jnp.int32)
  p = count.shape[0]
  full = lambda x, v: jnp.full((p,), v, jnp.int32) if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
  g = GHOST_FACTOR * p
  refs = jnp.full((REUSE_CLASSES + 1,), CLASS_PRIOR, jnp.float32)
  reused = refs * jnp.asarray([0.25] * REUSE_CLASSES + [0.4], jnp.float32)
  if reuse_rate is not None:
    refs = jnp.full_like(refs, 1000.0)
    reused = refs * jnp.asarray(reuse_rate, jnp.float32)
  return ClassFreqState(
      deferred(count, 1), deferred(full(last, 0), 1), deferred(full(gap, 0), 1),
      deferred(full(klass, -1), 2), deferred(jnp.zeros((g, 2), jnp.uint32), 1),
      deferred(jnp.zeros((g,), jnp.int32), 1), deferred(jnp.zeros((g,), jnp.int32), 1),
      deferred(jnp.full((g,), -1, jnp.int32), 1), refs, reused, jnp.int32(-1), jnp.int32(0),
      jnp.int32(0))


def _classfreq_init(num_pages: int) -> ClassFreqState:
  return classfreq_state(jnp.zeros((num_pages,), jnp.int32))


def first_seen_class(position, parent_count, last_full) -> jax.Array:
  """int32 reuse class of a first-seen full block: ``4 * parent + 2 * deep + last_full``.

  ``parent``: 0 at position 0 (or when the parent's count is unknown, ``parent_count``
  0), else ``min(parent_count, 3)`` (the count of the block before it in its sequence:
  new content after a block seen once, twice, more); ``deep``: position >= 3;
  ``last_full``: the sequence's last full block (a partial block follows it).

  >>> first_seen_class(jnp.array([0, 1, 5, 9]), jnp.array([0, 1, 2, 7]), jnp.array([0, 0, 1, 0])).tolist()
  [0, 4, 11, 14]
  """
  position = jnp.asarray(position, jnp.int32)
  parent = jnp.where(position > 0, jnp.clip(jnp.asarray(parent_count, jnp.int32), 0, 3), 0)
  return 4 * parent + 2 * (position >= 3).astype(jnp.int32) + jnp.asarray(last_full, jnp.int32)


def class_bonus(state: ClassFreqState) -> jax.Array:
  """float32 [C]: extra count credited to a first-seen block of each class, in [0, 1]:
  ``(p_k - p_1) / (p_2 - p_1)`` with ``p_k`` the class's learned reuse rate, ``p_1`` that of
  all first-seen full blocks and ``p_2`` that of blocks seen twice (0 = an ordinary new
  block, 1 = as good as a block seen twice)."""
  c = REUSE_CLASSES
  rate = state.reused / state.refs
  p1 = jnp.sum(state.reused[:c]) / jnp.sum(state.refs[:c])
  return jnp.clip((rate[:c] - p1) / jnp.maximum(rate[c] - p1, 1e-3), 0.0, 1.0)


def _classfreq_score(meta, state: ClassFreqState, clock, params):
  """``freqlru`` with two learned refinements (``age - credit * log2(count')``, partial
  pages first):

  * a first-seen full block counts ``1 + bonus`` instead of 1, ``bonus`` learned online per
    reuse class (``first_seen_class``: depth octaves, last full block of its sequence) from
    how often blocks of the class came back (on a hit or through the ghost table);
  * a block seen before is treated as used ``interval_weight * log2(gap / (interval_scale
    * pages))`` steps earlier, ``gap`` being its last re-reference interval (blocks that
    come back slowly are less likely to come back soon).
  """
  c = view(state.count)
  k = view(state.klass)
  bonus = class_bonus(state)[jnp.clip(k, 0, REUSE_CLASSES - 1)]
  first = (c <= 1) & (k >= 0) & (k < REUSE_CLASSES)
  eff = jnp.maximum(c, 1).astype(jnp.float32) + jnp.where(first, bonus, 0.0)
  raw = age(meta, clock) - params["credit"] * jnp.log2(eff)
  gap = view(state.gap)
  neutral = jnp.log2(params["interval_scale"] * live_pages(meta).astype(jnp.float32))
  slow = jnp.log2(jnp.maximum(gap, 1).astype(jnp.float32)) - neutral
  raw = raw + jnp.where((c >= 2) & (gap > 0), params["interval_weight"] * slow, 0.0)
  partial = meta.filled < page_size_of(meta)
  return finalize(jnp.where(partial, raw + CLASS_STEP, raw), meta)


def _classfreq_update(state: ClassFreqState, meta, access: Access, params):
  del params
  c = REUSE_CLASSES
  g = GHOST_FACTOR * live_pages(meta)
  s = jnp.maximum(access.slot, 0)
  real = (access.key[0] != 0) | (access.key[1] != 0)
  b = bucket(access.key, g)
  known = ~access.hit & same_key(access.key, get(state.ghost_key, b))
  seen = access.hit | known
  prev_count = jnp.where(access.hit, get(state.count, s), jnp.where(known, get(state.ghost_count, b), 0))
  prev_time = jnp.where(access.hit, get(state.last, s), get(state.ghost_last, b))
  prev_class = jnp.where(access.hit, get(state.klass, s), get(state.ghost_class, b))
  count = prev_count + 1
  gap = jnp.where(seen, jnp.maximum(access.clock - prev_time, 1), 0)
  partial = access.filled < page_size_of(meta)
  follows = (access.position > 0) & (access.position == state.prev_pos + 1)
  parent = jnp.where(follows, state.prev_count, 0)
  klass = jnp.where(partial, -1, jnp.where(count == 1, first_seen_class(access.position, parent, 0),
                                          jnp.where(count == 2, c, -1)))
  # learning: the previous reference's class was reused; this one's class gets a reference
  reused = state.reused.at[jnp.clip(prev_class, 0, c)].add(
      jnp.where(real & seen & (prev_class >= 0), 1.0, 0.0))
  refs = state.refs.at[jnp.clip(klass, 0, c)].add(jnp.where(real & (klass >= 0), 1.0, 0.0))
  # a partial block right after a first-seen full block of the same sequence: that block
  # was its sequence's last full block (moved to the ``last_full`` variant of its class)
  ps = jnp.maximum(state.prev_slot, 0)
  pk = get(state.klass, ps)
  mark = (partial & follows & (state.prev_slot >= 0) & (pk >= 0) & (pk < c) & (pk % 2 == 0))
  moved = jnp.where(mark, 1.0, 0.0)
  refs = refs.at[jnp.clip(pk, 0, c)].add(-moved).at[jnp.clip(pk + 1, 0, c)].add(moved)
  klass_arr = put(state.klass, state.prev_slot, pk + 1, mark)
  touched = access.hit | access.inserted
  # ghost: the displaced page's history, or a bypassed block's
  bypass = real & ~touched & ~partial
  gi = jnp.where(access.evicted, bucket(access.evicted_key, g), b)
  gw = access.evicted | bypass
  gkey = jnp.where(access.evicted, access.evicted_key, access.key)
  gcount = jnp.where(access.evicted, get(state.count, s), count)
  glast = jnp.where(access.evicted, get(state.last, s), access.clock)
  gclass = jnp.where(access.evicted, get(state.klass, s), klass)
  return ClassFreqState(
      count=put(state.count, access.slot, count, touched),
      last=put(state.last, access.slot, access.clock, touched),
      gap=put(state.gap, access.slot, gap, touched),
      klass=put(klass_arr, access.slot, klass, touched),
      ghost_key=put(state.ghost_key, gi, gkey, gw),
      ghost_count=put(state.ghost_count, gi, gcount, gw),
      ghost_last=put(state.ghost_last, gi, glast, gw),
      ghost_class=put(state.ghost_class, gi, gclass, gw),
      refs=refs, reused=reused, prev_slot=jnp.where(touched, access.slot, -1),
      prev_pos=access.position, prev_count=count)


def _classfreq_admit(state: ClassFreqState, meta, access: Access, victim, params):
  return _freqlru_admit(state, meta, access, victim, params)


# ---------------------------------------------------------------------------- auto-tuned classfreq


AUTOCLASS_SCALES = (0.0, 0.25, 1.0, 4.0)  # miniature credits, in units of ``credit``


def autoclass_credits(params) -> jax.Array:
  """float32 [4]: the miniature caches' credits, ``credit * AUTOCLASS_SCALES``."""
  return params["credit"] * jnp.asarray(AUTOCLASS_SCALES, jnp.float32)


def _autoclass_init(num_pages: int) -> AutoFreqLruState:
  return _auto_init(num_pages, len(AUTOCLASS_SCALES))._replace(main=_classfreq_init(num_pages))


def _autoclass_score(meta, state: AutoFreqLruState, clock, params):
  """``classfreq`` whose credit is picked online as in ``autofreq``: a sampled eighth of
  the keys is replayed through miniature ``freqlru`` caches of an eighth of the pool with
  credits 0 (LRU), 1/4, 1 and 4 times the fitted ``credit``, and the pool uses the credit
  of the miniature with the most recent hits. The re-reference interval weight is
  ``interval_frac`` times that credit, so a pool that follows LRU is LRU (partial pages
  first). The fitted credit is the prior; the miniatures keep it from collapsing on
  traffic where frequency does not pay."""
  credit = auto_credit(state, autoclass_credits(params))
  return _classfreq_score(meta, state.main, clock,
                          {**params, "credit": credit,
                           "interval_weight": params["interval_frac"] * credit})


def _autoclass_update(state: AutoFreqLruState, meta, access: Access, params):
  return _auto_update(state, meta, access, params, main_update=_classfreq_update,
                      credits=autoclass_credits(params))


# ---------------------------------------------------------------------------- registry


def _stateless(fn):
  return lambda meta, state, clock, params: fn(meta, clock, params)


_OPEN = (0.0, 1e9, True, False)
_WEIGHT = (0.0, 100.0, False, False)

POLICIES: dict[str, Policy] = {}


def _settled(update):
  """``update`` that first applies the writes the previous update deferred."""
  return lambda state, meta, access, params: update(settle_all(state), meta, access, params)


def register(policy: Policy) -> Policy:
  """Add ``policy`` to ``POLICIES`` under its name (replacing any of the same name).

  Its ``update`` is wrapped to ``settle`` deferred writes first (see ``kvjax.evict.Deferred``).
  """
  policy = policy._replace(update=_settled(policy.update))
  POLICIES[policy.name] = policy
  return policy


register(Policy("lru", _no_state, _stateless(lru_score), _no_update, None, {}, {}))
register(Policy("fifo", _fifo_init, _fifo_score, _fifo_update, None, {}, {}))
register(Policy("lru2", _lru2_init, _lru2_score, _lru2_update, None, {}, {}))
register(Policy("lfu", _lfu_init, _lfu_score, _lfu_update, None, {"half_life": 4096.0},
                {"half_life": _OPEN}))
register(Policy("s3fifo", _s3fifo_init, _s3fifo_score, _s3fifo_update, None,
                {"small_frac": 0.1, "partial_bias": 0.0},
                {"small_frac": (0.0, 1.0, True, True), "partial_bias": (0.0, 1.0, False, False)}))
register(Policy("weighted", _no_state, _stateless(weighted_score), _no_update, None,
                {"w_age": 1.0, "w_freq": 1.0, "w_size": 0.0, "w_cost": 0.0, "w_context": 0.0,
                 "age_scale": 4096.0},
                {"w_age": _WEIGHT, "w_freq": _WEIGHT, "w_size": _WEIGHT, "w_cost": _WEIGHT,
                 "w_context": _WEIGHT, "age_scale": _OPEN}))
register(Policy("greedydual", _gd_init, _gd_score, _gd_update, None,
                {"pos_weight": 0.05, "freq_exp": 1.0},
                {"pos_weight": (0.0, 100.0, False, False), "freq_exp": (0.0, 4.0, False, False)}))
register(Policy("lecar", _lecar_init, _lecar_score, _lecar_update, None,
                {"half_life": 4096.0, "regret_half_life": 4096.0, "learning_rate": 0.45},
                {"half_life": _OPEN, "regret_half_life": _OPEN,
                 "learning_rate": (0.0, 10.0, True, False)}))
register(with_tinylfu(POLICIES["lru"], "tinylfu"))
register(with_tinylfu(POLICIES["s3fifo"]))
register(Policy("freqlru", _freqlru_init, _freqlru_score, _freqlru_update, _freqlru_admit,
                {"credit": 24576.0, "admit_partial": 0.0},
                {"credit": (0.0, 1e8, False, False), "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("autofreq", _auto_init, _auto_score, _auto_update, _auto_admit,
                {"window": 8.0, "admit_partial": 0.0},
                {"window": (0.0, 1e6, True, False), "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("classfreq", _classfreq_init, _classfreq_score, _classfreq_update,
                _classfreq_admit,
                {"credit": 16384.0, "interval_weight": 4096.0, "interval_scale": 2.0,
                 "admit_partial": 0.0},
                {"credit": (0.0, 1e8, False, False), "interval_weight": (0.0, 1e8, False, False),
                 "interval_scale": (0.0, 1e6, True, False),
                 "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("autoclass", _autoclass_init, _autoclass_score, _autoclass_update,
                _auto_admit,
                {"credit": 16384.0, "window": 8.0, "interval_frac": 0.25, "interval_scale": 2.0,
                 "admit_partial": 0.0},
                {"credit": (0.0, 1e8, False, False), "window": (0.0, 1e6, True, False),
                 "interval_frac": (0.0, 100.0, False, False),
                 "interval_scale": (0.0, 1e6, True, False),
                 "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("min", _min_init, _min_score, _min_update, None, {}, {}, oracle=True))
register(Policy("min-bypass", _min_init, _min_score, _min_update, _min_admit, {}, {},
                oracle=True))


def get_policy(name: str) -> Policy:
  """The registered policy called ``name``; ValueError listing the known names otherwise.

  >>> get_policy("lru").name
  'lru'
  """
  if name not in POLICIES:
    raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
  return POLICIES[name]


def make_params(policy, **overrides) -> dict:
  """Validated float32 parameters of ``policy`` (a name or ``Policy``): defaults + overrides.

  Raises:
    ValueError: an unknown parameter, or a value outside its range (named, with the value).

  >>> float(make_params("lfu", half_life=100)["half_life"])
  100.0
  """
  policy = get_policy(policy) if isinstance(policy, str) else policy
  unknown = sorted(set(overrides) - set(policy.defaults))
  if unknown:
    raise ValueError(f"policy {policy.name!r}: unknown parameter(s) {unknown}; "
                     f"known: {sorted(policy.defaults)}")
  values = {**policy.defaults, **overrides}
  for k, v in values.items():
    lo, hi, lo_open, hi_open = policy.bounds[k]
    v = float(v)
    bad = (math.isnan(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi))
    if bad:
      interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
      raise ValueError(f"policy {policy.name!r}: parameter {k} must be in {interval}, got {v!r}")
  return {k: jnp.float32(v) for k, v in values.items()}


def score_and_evict(meta: PageMeta, policy_state, clock: jax.Array, n: int, policy,
                    params: Optional[dict] = None) -> tuple[jax.Array, jax.Array]:
  """Pick ``n`` pages to evict (or fill) with ``policy``: free pages first, in-use never.

  Args:
    meta: page metadata ([P] fields).
    policy_state: the policy's state (``policy.init(P)``, threaded through ``update``).
    clock: int32 [] current logical time.
    n: static number of pages wanted.
    policy: a ``Policy`` or a registered name.
    params: from ``make_params`` (defaults when None).

  Returns:
    ``(page_ids int32 [n], valid bool [n])``: best victim first; ``valid`` is False where
    fewer than ``n`` pages are evictable.

  >>> from kvjax.state import init_meta
  >>> m = init_meta(3, 1).replace(filled=jnp.ones(3, jnp.int32), last_access=jnp.array([5, 2, 7]))
  >>> ids, ok = score_and_evict(m, (), jnp.int32(9), 2, "lru")
  >>> ids.tolist(), ok.tolist()
  ([1, 0], [True, True])
  """
  policy = get_policy(policy) if isinstance(policy, str) else policy
  params = make_params(policy) if params is None else params
  return top_victims(policy.score(meta, policy_state, clock, params), n)
