"""Recency and frequency classics: LRU, FIFO, LRU-2, aged LFU, S3-FIFO, weighted,
GreedyDual-Size-Frequency, LeCaR; each registered (with its parameters' defaults and
bounds) next to its functions, in this order."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kvjax.layout.meta import PageMeta
from kvjax.policies.contract import Bound
from kvjax.policies.contract import FRACTION
from kvjax.policies.contract import no_state
from kvjax.policies.contract import no_update
from kvjax.policies.contract import Policy
from kvjax.policies.contract import POSITIVE
from kvjax.policies.contract import register
from kvjax.policies.contract import stateless
from kvjax.policies.contract import WEIGHT
from kvjax.policies.scoring import Access
from kvjax.policies.scoring import age
from kvjax.policies.scoring import AGE_CAP
from kvjax.policies.scoring import bucket
from kvjax.policies.scoring import CLASS_STEP
from kvjax.policies.scoring import Deferred
from kvjax.policies.scoring import deferred
from kvjax.policies.scoring import finalize
from kvjax.policies.scoring import get
from kvjax.policies.scoring import live_pages
from kvjax.policies.scoring import page_size_of
from kvjax.policies.scoring import put
from kvjax.policies.scoring import same_key
from kvjax.policies.scoring import view




# ---------------------------------------------------------------------------- LRU, FIFO


def lru_score(meta: PageMeta, clock: jax.Array, params=None) -> jax.Array:
  """LRU: the page unused the longest goes first.

  Args:
    meta: page metadata ([P] fields).
    clock: int32 [] current logical time.
    params: unused.

  Returns:
    float32 [P] scores (higher = evict first).

  >>> from kvjax.layout.meta import init_meta
  >>> m = init_meta(3, 1).replace(filled=jnp.ones(3, jnp.int32), last_access=jnp.array([5, 2, 7]))
  >>> int(jnp.argmax(lru_score(m, jnp.int32(9))))
  1
  """
  del params
  return finalize(age(meta, clock), meta)


LRU = register(Policy(name="lru", init=no_state, score=stateless(lru_score), update=no_update))


class FifoState(NamedTuple):
  inserted: Deferred  # int32 [P]  clock at which the page was filled


def _fifo_init(num_pages: int) -> FifoState:
  return FifoState(inserted=deferred(jnp.zeros((num_pages,), jnp.int32), 1))


def _fifo_score(state: FifoState, meta, clock, params):
  del params
  return finalize(jnp.clip(clock - view(state.inserted), 0, AGE_CAP).astype(jnp.float32), meta)


def _fifo_update(state: FifoState, meta, access: Access, params):
  del meta, params
  return FifoState(put(state.inserted, access.slot, access.clock, access.inserted))


FIFO = register(Policy(name="fifo", init=_fifo_init, score=_fifo_score, update=_fifo_update))


# ---------------------------------------------------------------------------- LRU-2


class Lru2State(NamedTuple):
  last: Deferred  # int32 [P]  clock of the page's last access
  prev: Deferred  # int32 [P]  clock of the access before it (-1 = only one so far)


def _lru2_init(num_pages: int) -> Lru2State:
  z = jnp.zeros((num_pages,), jnp.int32)
  return Lru2State(last=deferred(z, 1), prev=deferred(z - 1, 1))


def _lru2_score(state: Lru2State, meta, clock, params):
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


LRU2 = register(Policy(name="lru2", init=_lru2_init, score=_lru2_score, update=_lru2_update))


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


def _lfu_score(state: LfuState, meta, clock, params):
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


LFU = register(Policy(name="lfu", init=_lfu_init, score=_lfu_score, update=_lfu_update,
                      defaults={"half_life": 4096.0}, bounds={"half_life": POSITIVE}))


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


def _s3fifo_score(state: S3FifoState, meta, clock, params):
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


S3FIFO = register(Policy(
    name="s3fifo", init=_s3fifo_init, score=_s3fifo_score, update=_s3fifo_update,
    defaults={"small_frac": 0.1, "partial_bias": 0.0},
    bounds={"small_frac": Bound(0.0, 1.0, low_open=True, high_open=True),
            "partial_bias": FRACTION}))


# ---------------------------------------------------------------------------- weighted


def weighted_score(meta: PageMeta, clock: jax.Array, params: dict) -> jax.Array:
  """Multi-factor weighted score (temporal, frequency, size, recompute cost, context).

  ``w_age * age / age_scale - w_freq * log2(1 + access_count) - w_size * filled / page_size
  - w_cost * log2(1 + position) - w_context * log2(1 + children)``, where ``children`` is
  the number of pages whose ``parent`` is the page (evicting a shared prefix strands them).

  >>> from kvjax.policies.contract import make_params
  >>> from kvjax.layout.meta import init_meta
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


WEIGHTED = register(Policy(
    name="weighted", init=no_state, score=stateless(weighted_score), update=no_update,
    defaults={"w_age": 1.0, "w_freq": 1.0, "w_size": 0.0, "w_cost": 0.0, "w_context": 0.0,
              "age_scale": 4096.0},
    bounds={"w_age": WEIGHT, "w_freq": WEIGHT, "w_size": WEIGHT, "w_cost": WEIGHT,
            "w_context": WEIGHT, "age_scale": POSITIVE}))


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


def _gd_score(state: GreedyDualState, meta, clock, params):
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


GREEDYDUAL = register(Policy(
    name="greedydual", init=_gd_init, score=_gd_score, update=_gd_update,
    defaults={"pos_weight": 0.05, "freq_exp": 1.0},
    bounds={"pos_weight": WEIGHT, "freq_exp": Bound(0.0, 4.0)}))


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


def _lecar_score(state: LecarState, meta, clock, params):
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


LECAR = register(Policy(
    name="lecar", init=_lecar_init, score=_lecar_score, update=_lecar_update,
    defaults={"half_life": 4096.0, "regret_half_life": 4096.0, "learning_rate": 0.45},
    bounds={"half_life": POSITIVE, "regret_half_life": POSITIVE,
            "learning_rate": Bound(0.0, 10.0, low_open=True)}))
