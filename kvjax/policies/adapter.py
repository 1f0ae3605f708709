"""The eviction policy inside the cache: its scores, its history arrays, the events it sees.

``CacheConfig.eviction`` names any registered non-oracle policy of ``kvjax.policies``;
its parameters live in ``CacheState.policy_params`` (float32 [] arrays, initially
``config.eviction_params`` over the policy's defaults: ``initial_params``), so changing
one does not recompile a step. A policy that keeps history (LRU-2's second-to-last access, LFU's aged counts, S3-FIFO's
queues and ghost table, frequency sketches ...) keeps it in ``CacheState.policy`` (the
pytree its ``init(num_pages)`` returns; ``()`` for the stateless ``lru`` and
``weighted``), and the cache reports to it the same ``Access`` events the
simulator replays traces with:

* a **hit** when ``attach_prefix`` reuses a cached page (key = its block hash);
* an **eviction** when ``plan_step`` (or ``kvjax.pressure.relieve``) takes a cached page
  (``evicted``, ``evicted_key`` = the hash it held);
* an **insertion** when a page fills and enters the prefix index (key = its new hash);
* a **miss** that bypassed the cache when the policy's admission filter turns a filled
  page away (key = its hash, no page: frequency sketches still count it).

Events of one call are applied in order with a ``lax.scan`` (evictions before
insertions). A policy's ``admit`` filter decides whether a filled page enters the index
at all: a page it declines stays private to its sequence and is freed when the sequence
ends, instead of displacing a proven block later. The block it is compared with is the
one its page held before the cache took it (none: always admitted), as in the simulator.

In the simulator a miss evicts and inserts in one event; in the cache the page is taken
when the sequence needs it and indexed when it fills, so the two halves arrive as two
events. Tests replay a trace through both and get the same hits for order-based policies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.policies.contract import get_policy
from kvjax.policies.contract import make_params
from kvjax.policies.contract import Policy
from kvjax.policies.scoring import Access


KINDS = ("hit", "insert", "evict", "miss")


def policy_of(config) -> Policy:
  """The ``Policy`` named by ``config.eviction``."""
  return get_policy(config.eviction)


def initial_params(config) -> dict:
  """float32 [] parameters of ``config.eviction``: ``config.eviction_params`` over its
  defaults, validated by ``make_params`` (what ``CacheState.policy_params`` starts as).

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2, eviction="lfu",
  ...                         eviction_params=(("half_life", 50.0),))
  >>> {k: float(v) for k, v in initial_params(cfg).items()}
  {'half_life': 50.0}
  """
  return make_params(policy_of(config), **dict(config.eviction_params))


def is_stateless(policy) -> bool:
  """True when ``policy`` keeps no history arrays (its ``init`` returns an empty tree)."""
  return not jax.tree.leaves(jax.eval_shape(lambda: policy.init(1)))


def init_state(config):
  """The policy's history for a pool of ``config.num_pages`` pages (``()`` if none).

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2, eviction="fifo")
  >>> [a.shape for a in jax.tree.leaves(init_state(cfg))][:1]
  [(4,)]
  """
  policy = policy_of(config)
  return () if is_stateless(policy) else policy.init(config.num_pages)


def scores(policy_state, meta, clock, params: dict, config) -> jax.Array:
  """float32 [P]: free pages +inf, cached pages by ``config.eviction``, held pages -inf.

  Args:
    policy_state: ``CacheState.policy``.
    meta: page metadata.
    clock: int32 [] the cache's clock.
    params: ``CacheState.policy_params`` (float32 [] each).
    config: the cache's config.

  Under ``lru`` (integral ages), deeper blocks of equal age go first, so a chain loses
  its tail before its head.
  """
  out = policy_of(config).score(policy_state, meta, clock, params)
  if config.eviction == "lru":
    out = out + meta.position.astype(jnp.float32) / (config.max_pages_per_seq + 1)
  return out


def events(pages, keys, clock, *, kind: str, position=None, filled=None,
           evicted_keys=None) -> Access:
  """A batch of K ``Access`` events (leading axis K) of one kind.

  Args:
    pages: int32 [K] pages (out of range = no event).
    keys: uint32 [K, 2] block hashes of the referenced blocks (hits, insertions); None
      for evictions (no block is referenced: the key is (0, 0)).
    clock: int32 [] the cache's clock.
    kind: ``"hit"``, ``"insert"``, ``"evict"`` or ``"miss"`` (a block referenced but not
      admitted: the event carries its key and no page, ``slot`` -1).
    position: int32 [K] block index in the sequence (default 0).
    filled: int32 [K] tokens in the page (default 0).
    evicted_keys: uint32 [K, 2] hashes the pages held (``"evict"``).

  >>> e = events(jnp.array([3]), jnp.zeros((1, 2), jnp.uint32), jnp.int32(5), kind="hit")
  >>> e.hit.tolist(), e.slot.tolist()
  ([True], [3])
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  k = pages.shape[0]
  z = jnp.zeros((k,), jnp.int32)
  if keys is None or kind == "evict":
    keys = jnp.zeros((k, 2), jnp.uint32)
  real = pages >= 0
  ev = jnp.zeros((k, 2), jnp.uint32) if evicted_keys is None else evicted_keys
  keys = jnp.where(real[:, None], keys, jnp.uint32(0))
  return Access(
      slot=jnp.where(real & (kind != "miss"), pages, -1).astype(jnp.int32),
      key=keys.astype(jnp.uint32),
      hit=real & (kind == "hit"), inserted=real & (kind == "insert"),
      evicted=real & (kind == "evict") & jnp.any(ev != 0, axis=-1),
      evicted_key=ev.astype(jnp.uint32), clock=z + clock, next_use=z - 1,
      filled=z if filled is None else filled.astype(jnp.int32),
      position=z if position is None else position.astype(jnp.int32))


def filled_events(registered, declined, hashes, meta, clock) -> Access:
  """K events for the pages that filled in a step, in order: an insertion per page the
  index took, a miss (a reference that bypassed the cache, still counted as seen) per
  page the admission filter turned away, nothing for the rest.

  Args:
    registered, declined: int32 [K] pages (P = none), from ``register_full_pages``.
    hashes: uint32 [K, 2] their block hashes.
    meta: the page metadata after the step's writes.
    clock: int32 [] the step's clock.
  """
  p_ = meta.ref_count.shape[0]
  safe = jnp.clip(jnp.minimum(registered, declined), 0, p_ - 1)
  kw = dict(position=meta.position[safe], filled=meta.filled[safe])
  inserted = events(jnp.where(registered < p_, registered, -1), hashes, clock, kind="insert",
                    **kw)
  bypassed = events(jnp.where(declined < p_, declined, -1), hashes, clock, kind="miss", **kw)
  took = registered < p_
  return jax.tree.map(
      lambda a, b: jnp.where(took.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
      inserted, bypassed)


def report(policy_state, meta, batch: Access, params: dict, config):
  """The policy's state after the events of ``batch`` (applied in order; no-ops skipped).

  Args:
    policy_state: ``CacheState.policy``.
    meta: the page metadata the events happened against.
    batch: ``Access`` with a leading axis K (``events``).
    params: ``CacheState.policy_params``.
    config: the cache's config.
  """
  policy = policy_of(config)
  if is_stateless(policy):
    return policy_state
  p_ = config.num_pages

  def step(st, a):
    real = ((a.slot >= 0) & (a.slot < p_)) | jnp.any(a.key != 0)
    new = policy.update(st, meta, a, params)
    return jax.tree.map(lambda x, y: jnp.where(real, x, y), new, st), None

  return jax.lax.scan(step, policy_state, batch)[0]


def admit(policy_state, meta, clock, keys, pages, position, params: dict,
          config) -> jax.Array:
  """bool [K]: which filled pages the policy lets into the prefix index.

  As in the simulator, a block is compared with what its page held before the cache
  took it: call this with the metadata and policy state from *before* the step's
  allocation, so ``meta.filled[page] == 0`` means the page came free (always admitted)
  and ``meta.block_hash[page]`` is the block it displaced. Policies without an ``admit``
  filter take every page.

  Args:
    policy_state, meta: as before the step.
    clock: int32 [] the step's clock.
    keys: uint32 [K, 2] the pages' new block hashes.
    pages: int32 [K] the filled pages.
    position: int32 [K] their block index in the sequence.
    params: ``CacheState.policy_params``.
    config: the cache's config.
  """
  policy = policy_of(config)
  if policy.admit is None:
    return jnp.ones(pages.shape, bool)
  safe = jnp.clip(pages, 0, config.num_pages - 1)
  batch = events(safe, keys, clock, kind="insert", position=position,
                 filled=jnp.full(pages.shape, config.page_size, jnp.int32))
  one = lambda a, v: policy.admit(policy_state, meta, a, v, params)  # noqa: E731
  return jax.vmap(one)(batch, safe)
