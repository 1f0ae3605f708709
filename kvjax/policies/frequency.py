"""Frequency-aware policies: TinyLFU admission (an ``Admission``, composed with LRU as
``tinylfu`` and with S3-FIFO as ``tinylfu-s3fifo``), ``freqlru`` (frequency credit with a
ghost table), ``autofreq`` (credit picked online), ``classfreq`` (learned reuse classes and
re-reference intervals) and ``autoclass``; each registered next to its functions, in this
order."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kvjax.policies.classic import LRU
from kvjax.policies.classic import S3FIFO
from kvjax.policies.contract import Admission
from kvjax.policies.contract import Bound
from kvjax.policies.contract import FRACTION
from kvjax.policies.contract import Policy
from kvjax.policies.contract import register
from kvjax.policies.contract import with_admission
from kvjax.policies.scoring import Access
from kvjax.policies.scoring import age
from kvjax.policies.scoring import AGE_CAP
from kvjax.policies.scoring import bucket
from kvjax.policies.scoring import CLASS_STEP
from kvjax.policies.scoring import Deferred
from kvjax.policies.scoring import deferred
from kvjax.policies.scoring import finalize
from kvjax.policies.scoring import get
from kvjax.policies.scoring import key_hash
from kvjax.policies.scoring import live_pages
from kvjax.policies.scoring import page_size_of
from kvjax.policies.scoring import pool_pages
from kvjax.policies.scoring import put
from kvjax.policies.scoring import same_key
from kvjax.policies.scoring import view




# ---------------------------------------------------------------------------- TinyLFU admission

_SKETCH_ROWS = 4
_SKETCH_MAX = 15


class TinyLfuState(NamedTuple):
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


def _tinylfu_init(num_pages: int) -> TinyLfuState:
  z = jnp.zeros((_SKETCH_ROWS * num_pages,), jnp.int32)
  return TinyLfuState(deferred(z, _SKETCH_ROWS), deferred(z, _SKETCH_ROWS),
                      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def _tinylfu_update(state: TinyLfuState, meta, access: Access, params):
  # ``state`` is settled: ``with_admission``'s update settles both states first
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
  return TinyLfuState(counts, epoch, state.now + roll.astype(jnp.int32),
                      jnp.where(roll, 0, adds))


def _tinylfu_admit(state: TinyLfuState, meta, access: Access, victim, params):
  # the sketch counts the current reference in ``update``, after admission: add it here
  cand = _sketch_estimate(state, meta, access.key).astype(jnp.float32) + 1.0
  held = _sketch_estimate(state, meta, meta.block_hash[victim]).astype(jnp.float32)
  partial = access.filled < page_size_of(meta)
  need = held + jnp.where(partial, params["partial_margin"], 0.0)
  return (meta.filled[victim] == 0) | (cand > need)


# TinyLFU admission: a missing block takes the victim's page only if a count-min frequency
# sketch, counting this reference, has seen it more often than the victim (empty pages are
# always taken); otherwise it bypasses the cache. Counters halve every
# ``sample_factor * num_pages`` references. A partial block (``filled < page_size``) must
# beat the victim by ``partial_margin`` more.
TINYLFU_ADMISSION = Admission(
    name="tinylfu", init=_tinylfu_init, update=_tinylfu_update, admit=_tinylfu_admit,
    defaults={"sample_factor": 10.0, "partial_margin": 0.0},
    bounds={"sample_factor": Bound(0.0, 1e6, low_open=True), "partial_margin": Bound(0.0, 16.0)})


def with_tinylfu(inner: Policy, name: Optional[str] = None) -> Policy:
  """``inner`` behind the TinyLFU admission filter (``with_admission(inner,
  TINYLFU_ADMISSION, name)``).

  >>> with_tinylfu(LRU).name
  'tinylfu-lru'
  """
  return with_admission(inner, TINYLFU_ADMISSION, name)


TINYLFU = register(with_tinylfu(LRU, "tinylfu"))
TINYLFU_S3FIFO = register(with_tinylfu(S3FIFO))


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


def _log2_count(count: jax.Array) -> jax.Array:
  """float32: log2 of int reference counts, 0 counted as 1. XLA's log2 gives the same bits
  vectorized or not, so a log stored when a count is written equals one taken at score
  time."""
  return jnp.log2(jnp.maximum(count, 1).astype(jnp.float32))


def _freqlru_score(state: FreqLruState, meta, clock, params):
  """LRU with a frequency credit: a block referenced ``c`` times is treated as if used
  ``credit * log2(c)`` steps later than it was. Counts survive eviction in a ghost table
  (``GHOST_FACTOR * num_pages`` hashed entries), so a block coming back keeps its history. Partial
  pages go first."""
  raw = age(meta, clock) - params["credit"] * _log2_count(view(state.count))
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


FREQLRU = register(Policy(
    name="freqlru", init=_freqlru_init, score=_freqlru_score, update=_freqlru_update,
    admit=_freqlru_admit, defaults={"credit": 24576.0, "admit_partial": 0.0},
    bounds={"credit": Bound(0.0, 1e8), "admit_partial": FRACTION}))


# ---------------------------------------------------------------------------- auto-tuned freqlru

MINI_CREDITS = (0.0, 2048.0, 8192.0, 24576.0, 65536.0)  # candidate credits (0 = LRU)
MINI_RATE = 8  # one key in MINI_RATE is replayed through the miniature caches


class AutoFreqLruState(NamedTuple):
  main: FreqLruState      # the real pool's state
  mini_key: Deferred      # uint32 [K * m, 2]  miniature caches' blocks (m = P // 8 each)
  mini_last: Deferred     # int32 [K * m]  their last access clocks
  mini_count: Deferred    # int32 [K * m]  their reference counts (0 = empty)
  mini_lcount: Deferred   # float32 [K * m]  log2(max(count, 1)), written with the count (a
                          #   log2 of every cell per replay was half the sampled step)
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
      mini_lcount=deferred(jnp.zeros((k * m,), jnp.float32), k),
      mini_gkey=deferred(jnp.zeros((k * GHOST_FACTOR * m, 2), jnp.uint32), k),
      mini_gcount=deferred(jnp.zeros((k * GHOST_FACTOR * m,), jnp.int32), k),
      mini_hits=jnp.zeros((k,), jnp.float32))


def auto_credit(state: AutoFreqLruState, credits=MINI_CREDITS) -> jax.Array:
  """float32 []: the credit (of ``credits``, float [K]) of the miniature cache with the
  most (decayed) hits."""
  return jnp.asarray(credits, jnp.float32)[jnp.argmax(state.mini_hits)]


def _auto_score(state: AutoFreqLruState, meta, clock, params):
  """``freqlru`` whose credit is picked online: one key in 8 (by hash) is also replayed
  through five miniature ``freqlru`` caches of an eighth of the pool (credits
  ``MINI_CREDITS``, 0 being LRU), and the pool follows the miniature with the most
  recent hits (half-life ``window`` pool sizes of sampled references). Spatially
  sampled miniatures track the full cache's hit ratio (Waldspurger et al., ATC'17), so
  the choice follows the traffic and the capacity instead of a fitted constant."""
  return _freqlru_score(state.main, meta, clock, {**params, "credit": auto_credit(state)})


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
    lcount = view(state.mini_lcount)[rows]
    usable = jnp.arange(m)[None, :] < m_eff
    match = same_key(keys, access.key[None, None, :]) & usable
    hit = match.any(axis=1)                                               # [K]
    pos = jnp.argmax(match, axis=1)
    credit = jnp.asarray(credits, jnp.float32)[:, None]
    score = (jnp.clip(access.clock - last, 0, AGE_CAP).astype(jnp.float32)
             - credit * lcount)
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
    new_lcount = _log2_count(new_count)
    mk, ml, mc, mlc, gk, gc = (state.mini_key, state.mini_last, state.mini_count,
                               state.mini_lcount, state.mini_gkey, state.mini_gcount)
    for j in range(k):
      mk = put(mk, cell[j], access.key, write[j])
      ml = put(ml, cell[j], access.clock, write[j])
      mc = put(mc, cell[j], new_count[j], write[j])
      mlc = put(mlc, cell[j], new_lcount[j], write[j])
      gk = put(gk, eb[j], ekey[j], evicting[j])
      gc = put(gc, eb[j], count[j, victim[j]], evicting[j])
    decay = jnp.exp2(-1.0 / (params["window"] * jnp.maximum(m_eff, 1).astype(jnp.float32)))
    hits = jnp.where(sampled, state.mini_hits * decay + hit.astype(jnp.float32), state.mini_hits)
    return AutoFreqLruState(main, mk, ml, mc, mlc, gk, gc, hits)

  # one reference in MINI_RATE is sampled; the key alone decides, so this stays a branch
  # (not a select) when runs are vmapped over capacities or parameters
  return jax.lax.cond(sampled, replay, lambda st: st._replace(main=main), state)


def _auto_admit(state: AutoFreqLruState, meta, access: Access, victim, params):
  return _freqlru_admit(state.main, meta, access, victim, params)


AUTOFREQ = register(Policy(
    name="autofreq", init=_auto_init, score=_auto_score, update=_auto_update,
    admit=_auto_admit, defaults={"window": 8.0, "admit_partial": 0.0},
    bounds={"window": Bound(0.0, 1e6, low_open=True), "admit_partial": FRACTION}))


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
  """A ``ClassFreqState`` from int32 [P] counts (and int32 [P] classes, intervals, last
  clocks; a float [C + 1] per-class reuse rate, weighted as 1000 references), with an
  empty ghost table.

  >>> st = classfreq_state([1, 2], klass=[4, REUSE_CLASSES])
  >>> view(st.count).tolist(), view(st.klass).tolist(), st.refs.shape
  ([1, 2], [4, 16], (17,))
  """
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
  block, 1 = as good as a block seen twice).

  >>> rate = [0.25] * REUSE_CLASSES + [0.5]
  >>> rate[3] = 0.5
  >>> [round(float(b), 2) for b in class_bonus(classfreq_state([1], reuse_rate=rate))[2:4]]
  [0.0, 1.0]
  """
  c = REUSE_CLASSES
  rate = state.reused / state.refs
  p1 = jnp.sum(state.reused[:c]) / jnp.sum(state.refs[:c])
  return jnp.clip((rate[:c] - p1) / jnp.maximum(rate[c] - p1, 1e-3), 0.0, 1.0)


def _classfreq_score(state: ClassFreqState, meta, clock, params):
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
  neutral = jnp.log2(params["interval_scale"] * pool_pages(meta, params).astype(jnp.float32))
  slow = _log2_count(gap) - neutral
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


CLASSFREQ = register(Policy(
    name="classfreq", init=_classfreq_init, score=_classfreq_score, update=_classfreq_update,
    admit=_classfreq_admit,
    defaults={"credit": 16384.0, "interval_weight": 4096.0, "interval_scale": 2.0,
              "admit_partial": 0.0},
    bounds={"credit": Bound(0.0, 1e8), "interval_weight": Bound(0.0, 1e8),
            "interval_scale": Bound(0.0, 1e6, low_open=True), "admit_partial": FRACTION}))


# ---------------------------------------------------------------------------- auto-tuned classfreq


AUTOCLASS_SCALES = (0.0, 0.25, 1.0, 4.0)  # miniature credits, in units of ``credit``


def autoclass_credits(params) -> jax.Array:
  """float32 [4]: the miniature caches' credits, ``credit * AUTOCLASS_SCALES``.

  >>> autoclass_credits({"credit": jnp.float32(1000.0)}).tolist()
  [0.0, 250.0, 1000.0, 4000.0]
  """
  return params["credit"] * jnp.asarray(AUTOCLASS_SCALES, jnp.float32)


def _autoclass_init(num_pages: int) -> AutoFreqLruState:
  return _auto_init(num_pages, len(AUTOCLASS_SCALES))._replace(main=_classfreq_init(num_pages))


def _autoclass_score(state: AutoFreqLruState, meta, clock, params):
  """``classfreq`` whose credit is picked online as in ``autofreq``: a sampled eighth of
  the keys is replayed through miniature ``freqlru`` caches of an eighth of the pool with
  credits 0 (LRU), 1/4, 1 and 4 times the fitted ``credit``, and the pool uses the credit
  of the miniature with the most recent hits. The re-reference interval weight is
  ``interval_frac`` times that credit, so a pool that follows LRU is LRU (partial pages
  first). The fitted credit is the prior; the miniatures keep it from collapsing on
  traffic where frequency does not pay."""
  credit = auto_credit(state, autoclass_credits(params))
  return _classfreq_score(state.main, meta, clock,
                          {**params, "credit": credit,
                           "interval_weight": params["interval_frac"] * credit})


def _autoclass_update(state: AutoFreqLruState, meta, access: Access, params):
  return _auto_update(state, meta, access, params, main_update=_classfreq_update,
                      credits=autoclass_credits(params))


AUTOCLASS = register(Policy(
    name="autoclass", init=_autoclass_init, score=_autoclass_score, update=_autoclass_update,
    admit=_auto_admit,
    defaults={"credit": 16384.0, "window": 8.0, "interval_frac": 0.25, "interval_scale": 2.0,
              "admit_partial": 0.0},
    bounds={"credit": Bound(0.0, 1e8), "window": Bound(0.0, 1e6, low_open=True),
            "interval_frac": Bound(0.0, 100.0), "interval_scale": Bound(0.0, 1e6, low_open=True),
            "admit_partial": FRACTION}))
