"""The ``learned`` policy: eviction and admission by a trained next-use predictor.

At every reference the policy reads the block's row of a hashed history table
(``kvjax.learned.features``), computes its features, and runs the predictor
(``kvjax.learned.models``: MLP, LSTM or Transformer) to get class probabilities of its
next-use distance, kept for the page. Then:

* **eviction**: a page of age ``a`` (references since its last access) is evicted first
  when it is least likely to be used within the next ``H`` references given that it
  has not been used for ``a``: the highest ``S(a + H) / S(a)``, ``S`` the predicted
  survival (``labels.class_cdf``). The horizon is tied to the
  cache: a block stays about ``capacity / miss rate`` references in a cache that
  inserts on every miss, so ``H = horizon * capacity / miss rate`` (the miss rate a
  running average over ``MISS_WINDOW`` references). It scores every page, or the
  sample the simulator's sampled path hands it.
* **admission**: a missing block is cached only if its predicted chance of reuse within
  ``H`` is at least ``admit`` times the victim's conditional chance; a block predicted
  not to return before eviction bypasses the cache (``admit = 0``: always cache).
* **online fine-tuning**: a per-class bias on the logits is trained on the stream with
  SGD (rate ``online_lr``): when a block comes back, its previous prediction is scored
  against the gap observed; a table row unseen for ``2^16`` references (checked one row
  per reference, and when a colliding key takes the row) is scored as "not reused".
  Only the past is used.
* **a safety net** (``duel = 1``): two miniature caches (``Duel``) replay one key in
  ``DUEL_RATE``, one with LRU and one with this policy; while LRU's miniature hits more
  (by ``duel_margin``), the cache evicts by recency and admits every block, as LRU.
* **prefetch ranking**: ``rank_blocks`` scores blocks by predicted reuse (the L3
  prefetcher reads ahead the highest first).

The predictor's parameters are arrays of the policy state (``LearnedState.model``), so
``with_model`` swaps them without recompiling a step. The registered ``learned``
policy loads the parameters shipped as package data (``kvjax/learned/pretrained/``,
trained on the first 70 % of the Mooncake conversation trace by
``benchmarks/learned.py``); ``learned_policy`` builds one from any predictor.
Names in shapes: P = pages, G = history rows, K = gaps, B = classes, M = parameters.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple, TYPE_CHECKING

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

from kvjax.learned.features import block_features
from kvjax.learned.features import GAPS
from kvjax.learned.features import key_bucket
from kvjax.learned.features import TABLE_SIZE
from kvjax.learned.labels import EDGES
from kvjax.learned.labels import NUM_CLASSES
from kvjax.learned.labels import class_cdf
from kvjax.policies.contract import Bound
from kvjax.policies.contract import FRACTION
from kvjax.policies.contract import Policy
from kvjax.policies.contract import POSITIVE
from kvjax.policies.contract import register
from kvjax.policies.contract import WEIGHT
from kvjax.policies.scoring import Access
from kvjax.policies.scoring import age
from kvjax.policies.scoring import Deferred
from kvjax.policies.scoring import deferred
from kvjax.policies.scoring import finalize
from kvjax.policies.scoring import get
from kvjax.policies.scoring import live_pages
from kvjax.policies.scoring import page_size_of
from kvjax.policies.scoring import put
from kvjax.policies.scoring import view

if TYPE_CHECKING:   # flax, optax and orbax load when a predictor is first restored
  from kvjax.learned.models import Predictor

PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "learned", "pretrained")
EXPIRE = EDGES[-1]   # a row unseen this long is labelled "not reused" (the last class)
BIAS_CLIP = 6.0
MISS_WINDOW = 4096.0   # references over which the miss rate is averaged
MIN_MISS_RATE = 0.05


class LearnedState(NamedTuple):
  """History table, per-page predictions and the predictor's parameters."""

  model: jax.Array     # float32 [M]  flat predictor parameters, then B online logit biases
  probs: Deferred      # float32 [P, B]  class probabilities predicted at the last access
  tag: Deferred        # uint32 [G]  key tag of the row's block (0 = empty)
  last: Deferred       # int32 [G]  clock of its last reference
  count: Deferred      # int32 [G]  its references
  gaps: Deferred       # int32 [G, K]  its last inter-reference gaps, newest first
  logits: Deferred     # float32 [G, B]  raw logits predicted at its last reference
  pending: Deferred    # int32 [G]  1 while that prediction awaits its label
  prev: jax.Array      # int32 [5]  previous reference: position, count, known prefix,
                       #            and the deepest known block's count and gap
  horizon: jax.Array   # float32 []  H in references (horizon * capacity / miss rate)
  miss_rate: jax.Array  # float32 []  running share of references that miss
  duel: "Duel"         # miniature caches: LRU against the learned policy


class Duel(NamedTuple):
  """Two miniature caches of ``capacity / DUEL_RATE`` entries replaying the references of
  one key in ``DUEL_RATE`` (by hash): LRU and the learned policy. The cache follows LRU
  while LRU's miniature hits more (decayed counts, by ``duel_margin``)."""

  lru_key: jax.Array   # uint32 [m]  tags in the LRU miniature (0 = empty)
  lru_last: jax.Array  # int32 [m]  their last references (-1 = empty)
  ml_key: jax.Array    # uint32 [m]  tags in the learned miniature
  ml_last: jax.Array   # int32 [m]
  ml_probs: jax.Array  # float32 [m, B]  their predictions
  hits: jax.Array      # float32 [2]  decayed hits of the LRU and learned miniatures


DUEL_RATE = 8
DUEL_DECAY = 1.0 - 1.0 / 2048.0   # per sampled reference


def _duel_size(num_pages: int) -> int:
  m = num_pages // DUEL_RATE + 1
  return m if m != num_pages else m + 1   # never a per-page leaf (see ``_gather_rows``)


def _duel_init(num_pages: int) -> Duel:
  m = _duel_size(num_pages)
  z = jnp.zeros((m,), jnp.uint32)
  e = jnp.full((m,), -1, jnp.int32)
  return Duel(z, e, z, e, jnp.full((m, NUM_CLASSES), 1.0 / NUM_CLASSES), jnp.zeros(2))


def _duel_step(d: Duel, tag, clock, probs, capacity, horizon, admit, on) -> Duel:
  """One sampled reference (``on``) through both miniatures."""
  m = d.lru_key.shape[0]
  live = jnp.arange(m) < jnp.maximum(capacity // DUEL_RATE, 1)
  match = (d.lru_key == tag) & live
  hit_l = jnp.any(match)
  slot = jnp.where(hit_l, jnp.argmax(match),
                   jnp.argmin(jnp.where(live, d.lru_last, jnp.iinfo(jnp.int32).max)))
  slot = jnp.where(on, slot, m)
  lru_key = d.lru_key.at[slot].set(tag, mode="drop")
  lru_last = d.lru_last.at[slot].set(clock, mode="drop")
  match = (d.ml_key == tag) & live
  hit_m = jnp.any(match)
  a = jnp.clip(clock - d.ml_last, 0, None).astype(jnp.float32)
  r = _survival_ratio(d.ml_probs, a, horizon)
  r = jnp.where(d.ml_key == 0, jnp.inf, jnp.where(live, r, -jnp.inf))
  victim = jnp.argmax(r)
  theirs = 1.0 - _survival_ratio(d.ml_probs[victim], a[victim], horizon)
  take = hit_m | (d.ml_key[victim] == 0) | (class_cdf(probs, horizon) >= admit * theirs)
  slot = jnp.where(on & take, jnp.where(hit_m, jnp.argmax(match), victim), m)
  ml_key = d.ml_key.at[slot].set(tag, mode="drop")
  ml_last = d.ml_last.at[slot].set(clock, mode="drop")
  ml_probs = d.ml_probs.at[slot].set(probs, mode="drop")
  got = jnp.stack([hit_l, hit_m]).astype(jnp.float32)
  hits = jnp.where(on, d.hits * DUEL_DECAY + got, d.hits)
  return Duel(lru_key, lru_last, ml_key, ml_last, ml_probs, hits)


def _follow_lru(state, params) -> jax.Array:
  h = state.duel.hits
  return (params["duel"] > 0.5) & (h[0] > h[1] * (1.0 + params["duel_margin"]) + 1.0)


class _Lookup(NamedTuple):
  row: jax.Array
  tag: jax.Array
  known: jax.Array
  count: jax.Array
  gap: jax.Array
  gaps: jax.Array
  run: jax.Array
  run_count: jax.Array
  run_gap: jax.Array
  features: jax.Array


def _lookup(state: LearnedState, meta, access: Access) -> _Lookup:
  g = state.tag.array.shape[0]
  row, tg = key_bucket(access.key, g)
  known = get(state.tag, row) == tg
  count = jnp.where(known, get(state.count, row), 0)
  gap = jnp.where(known, access.clock - get(state.last, row), 0)
  gaps = jnp.where(known, get(state.gaps, row), 0)
  prev_pos, prev_count = state.prev[0], state.prev[1]
  contiguous = access.position == prev_pos + 1
  parent = jnp.where(contiguous, prev_count, 0)
  inherit = contiguous & (access.position > 0)
  run, rc, rg = (jnp.where(inherit, state.prev[k], 0) for k in (2, 3, 4))
  extend = (run == access.position) & known
  run = jnp.where(extend, access.position + 1, run)
  rc, rg = jnp.where(extend, count, rc), jnp.where(extend, gap, rg)
  feats = block_features(count, gap, gaps, access.position, access.filled,
                         page_size_of(meta), parent, run, rc, rg)
  return _Lookup(row, tg, known, count, gap, gaps, run, rc, rg, feats)


def features_of(state: LearnedState, meta, access: Access) -> jax.Array:
  """float32 [F]: the features the policy computes for ``access`` (before its update),
  equal to ``kvjax.learned.features.extract`` at that reference (a test checks it)."""
  return _lookup(state, meta, access).features


def _klass(dist: jax.Array) -> jax.Array:
  return jnp.searchsorted(jnp.asarray(EDGES), dist, side="right").astype(jnp.int32)


def _survival_ratio(probs, a, h):
  s_a = 1.0 - class_cdf(probs, a)
  s_ah = 1.0 - class_cdf(probs, a + h)
  return s_ah / jnp.maximum(s_a, 1e-6)


def learned_policy(pred: Predictor, params: Any, name: str = "learned",
                   table_size: int = TABLE_SIZE) -> Policy:
  """A ``Policy`` evicting and admitting by ``pred`` with parameters ``params``.

  Args:
    pred: a ``models.Predictor``; params: its parameter state.
    name: the policy's name (register it under a name of its own: the simulator
      compiles once per name).
    table_size: history table rows (``features.extract`` must use the same).

  >>> from kvjax.learned.models import make_model, predictor
  >>> p = learned_policy(*predictor(make_model("linear")), name="doc-learned")
  >>> sorted(p.defaults)
  ['admit', 'duel', 'duel_margin', 'horizon', 'online_lr']
  """
  flat0, unravel = ravel_pytree(params)
  nparams = int(flat0.shape[0])

  def split(model):
    return unravel(model[:nparams]), model[nparams:nparams + NUM_CLASSES]

  def init(num_pages: int) -> LearnedState:
    g = table_size if num_pages != table_size else table_size + 2
    m = nparams + NUM_CLASSES
    pad = 1 if m == num_pages else 0
    model = jnp.concatenate([flat0.astype(jnp.float32), jnp.zeros(NUM_CLASSES + pad)])
    z = jnp.zeros((g,), jnp.int32)
    return LearnedState(
        model=model,
        probs=deferred(jnp.full((num_pages, NUM_CLASSES), 1.0 / NUM_CLASSES), 1),
        tag=deferred(jnp.zeros((g,), jnp.uint32), 1), last=deferred(z, 1),
        count=deferred(z, 1), gaps=deferred(jnp.zeros((g, GAPS), jnp.int32), 1),
        logits=deferred(jnp.zeros((g, NUM_CLASSES), jnp.float32), 1),
        pending=deferred(z, 2), prev=jnp.array([-2, 0, 0, 0, 0], jnp.int32),
        horizon=jnp.float32(2.0 * num_pages), miss_rate=jnp.float32(1.0),
        duel=_duel_init(num_pages))

  def predict(state, lk):
    p, bias = split(state.model)
    raw = pred.predict(p, lk.features)
    return raw, jax.nn.softmax(raw + bias)

  def score(state: LearnedState, meta, clock, params):
    a = age(meta, clock)
    r = _survival_ratio(view(state.probs), a, state.horizon)
    return finalize(jnp.where(_follow_lru(state, params), a, r + 1e-4 * jnp.log1p(a) / 20.0),
                    meta)

  def update(state: LearnedState, meta, access: Access, params):
    real = (access.key[0] != 0) | (access.key[1] != 0)
    lk = _lookup(state, meta, access)
    raw, probs = predict(state, lk)
    # online fine-tuning of the logit biases on labels the past has revealed
    model = state.model
    _, bias = split(model)
    lr = params["online_lr"]

    def sgd(bias, logits, klass, on):
      grad = jax.nn.softmax(logits + bias) - jax.nn.one_hot(klass, NUM_CLASSES)
      return jnp.clip(bias - jnp.where(on, lr, 0.0) * grad, -BIAS_CLIP, BIAS_CLIP)

    old_pending = get(state.pending, lk.row) > 0
    bias = sgd(bias, get(state.logits, lk.row), _klass(lk.gap),
               real & lk.known & old_pending)
    other = get(state.tag, lk.row)
    stale = access.clock - get(state.last, lk.row) >= EXPIRE
    bias = sgd(bias, get(state.logits, lk.row), jnp.int32(NUM_CLASSES - 1),
               real & ~lk.known & (other != 0) & old_pending & stale)
    # one row per reference: "not reused" once it has expired
    g = state.tag.array.shape[0]
    q = (access.clock.astype(jnp.uint32) * jnp.uint32(40503) % jnp.uint32(g)).astype(jnp.int32)
    q_age = access.clock - get(state.last, q)
    q_open = (get(state.pending, q) > 0) & (q != lk.row) & real
    q_due = q_open & (q_age >= EXPIRE)
    bias = sgd(bias, get(state.logits, q), jnp.int32(NUM_CLASSES - 1), q_due)

    model = jnp.concatenate([model[:nparams], bias, model[nparams + NUM_CLASSES:]])
    new_gaps = jnp.where(lk.known, jnp.concatenate([lk.gap[None], lk.gaps[:-1]]), 0)
    on_page = real & (access.hit | access.inserted)
    capacity = live_pages(meta).astype(jnp.float32)
    miss = (real & ~access.hit).astype(jnp.float32)
    miss_rate = jnp.where(real, state.miss_rate + (miss - state.miss_rate) / MISS_WINDOW,
                          state.miss_rate)
    return LearnedState(
        model=model,
        probs=put(state.probs, access.slot, probs, on_page),
        tag=put(state.tag, lk.row, lk.tag, real),
        last=put(state.last, lk.row, access.clock, real),
        count=put(state.count, lk.row, lk.count + 1, real),
        gaps=put(state.gaps, lk.row, new_gaps, real),
        logits=put(state.logits, lk.row, raw, real),
        pending=put(put(state.pending, q, 0, q_due), lk.row, 1, real),
        prev=jnp.where(real, jnp.stack([access.position, lk.count + 1, lk.run, lk.run_count,
                                                  lk.run_gap]), state.prev),
        horizon=params["horizon"] * capacity / jnp.maximum(miss_rate, MIN_MISS_RATE),
        miss_rate=miss_rate,
        duel=_duel_step(state.duel, lk.tag, access.clock, probs, live_pages(meta),
                        state.horizon, params["admit"],
                        real & ((lk.tag >> 8) % jnp.uint32(DUEL_RATE) == 0)))

  def admit(state: LearnedState, meta, access: Access, victim, params):
    lk = _lookup(state, meta, access)
    _, probs = predict(state, lk)
    mine = class_cdf(probs, state.horizon)
    a = age(meta, access.clock)[victim]
    theirs = 1.0 - _survival_ratio(get(state.probs, victim), a, state.horizon)
    return ((meta.filled[victim] == 0) | (mine >= params["admit"] * theirs)
            | _follow_lru(state, params))

  def rank(state: LearnedState, keys, position, filled, clock, page_size: int):
    p, bias = split(state.model)

    def one(key, pos, fill):
      g = state.tag.array.shape[0]
      row, tg = key_bucket(key, g)
      known = get(state.tag, row) == tg
      count = jnp.where(known, get(state.count, row), 0)
      gap = jnp.where(known, clock - get(state.last, row), 0)
      gaps = jnp.where(known, get(state.gaps, row), 0)
      return block_features(count, gap, gaps, pos, fill, page_size, count, pos, count, gap)

    feats = jax.vmap(one)(keys.astype(jnp.uint32), position, filled)
    probs = jax.nn.softmax(pred.predict(p, feats) + bias)
    return class_cdf(probs, state.horizon)

  _RANKERS[name] = rank
  return Policy(name=name, init=init, score=score, update=update, admit=admit,
                defaults=dict(DEFAULTS), bounds=dict(BOUNDS))


def with_model(state: LearnedState, pred: Predictor, params: Any) -> LearnedState:
  """``state`` with new predictor parameters (same shapes: no recompilation); the online
  biases are kept.

  Raises:
    ValueError: ``params`` do not have the size of the state's predictor.
  """
  flat, _ = ravel_pytree(params)
  del pred
  n = int(flat.shape[0])
  if n + NUM_CLASSES > state.model.shape[0]:
    raise ValueError(f"params have {n} values; the state's model holds "
                     f"{state.model.shape[0] - NUM_CLASSES}")
  return state._replace(model=state.model.at[:n].set(flat.astype(jnp.float32)))


def rank_blocks(policy, state: LearnedState, keys: jax.Array, position: jax.Array,
                filled: jax.Array, clock: jax.Array, page_size: int) -> jax.Array:
  """float32 [K]: predicted chance that each block is referenced within the horizon, for
  ranking prefetches (highest first).

  Args:
    policy: a learned policy (a ``Policy`` from ``learned_policy``, or its name).
    state: its state; keys: uint32 [K, 2] block hashes; position, filled: int32 [K]
      (block index in its sequence, tokens); clock: int32 []; page_size: tokens per
      block (static).

  A block is taken as the next of a sequence whose leading blocks are all known.

  >>> from kvjax.learned.models import make_model, predictor
  >>> p = learned_policy(*predictor(make_model("linear")), name="doc-rank")
  >>> r = rank_blocks(p, p.init(4), jnp.ones((3, 2), jnp.uint32), jnp.arange(3),
  ...                 jnp.full(3, 16), jnp.int32(0), 16)
  >>> r.shape, bool(((r >= 0) & (r <= 1)).all())
  ((3,), True)
  """
  name = policy if isinstance(policy, str) else policy.name
  if name not in _RANKERS:
    raise ValueError(f"policy must be a learned policy, one of {sorted(_RANKERS)}, got "
                     f"{name!r}")
  if name == "learned":
    _built()
  return _RANKERS[name](state, keys, position, filled, clock, page_size)


_RANKERS: dict = {}


@functools.cache
def _built() -> Policy:
  """The ``learned`` policy with the shipped parameters (restored on first use)."""
  path = os.path.join(PRETRAINED, "kind.json")
  if not os.path.exists(path):
    raise ValueError(f"the learned policy's shipped parameters are missing ({PRETRAINED})")
  from kvjax.learned.train import restore   # flax, optax, orbax: not on kvjax's import path
  with jax.ensure_compile_time_eval():   # first use may come inside a trace (vmap, jit)
    pred, params = restore(PRETRAINED)
  return learned_policy(pred, params, name="learned")


def _lazy(field: str):
  return lambda *args: getattr(_built(), field)(*args)


def _shipped_defaults() -> dict:
  """The policy parameters tuned with the shipped predictor (``policy.json``), else fixed
  fallbacks."""
  out = {"horizon": 1.0, "admit": 1.0, "online_lr": 0.0, "duel": 1.0, "duel_margin": 0.02}
  path = os.path.join(PRETRAINED, "policy.json")
  if os.path.exists(path):
    with open(path) as f:
      out.update({k: float(v) for k, v in json.load(f)["defaults"].items() if k in out})
  return out


DEFAULTS = _shipped_defaults()
BOUNDS = {"horizon": POSITIVE, "admit": WEIGHT, "online_lr": FRACTION, "duel": FRACTION,
          "duel_margin": Bound(0.0, 10.0)}

# The registered policy restores the shipped predictor when first used, not on import.
LEARNED = register(Policy(name="learned", init=_lazy("init"), score=_lazy("score"),
                          update=_lazy("update"), admit=_lazy("admit"), defaults=DEFAULTS,
                          bounds=BOUNDS))
