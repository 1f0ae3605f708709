"""The page pool: the one module that takes, frees and evicts pages.

A page is *held* (``ref_count > 0``: some live sequence's page table names
it), *cached* (``ref_count == 0`` with a block hash: in the prefix index,
evictable) or *free* (``ref_count == 0``, no hash, ``filled == 0``). Every
transition goes through here: ``victims`` ranks the pages a step may take
(free first, then cached pages by the eviction policy, held pages never);
``reclaim`` empties the pages about to be reused, evicting the cached ones
(the policy hears of it, the index forgets them and orphans their cached
children); ``release`` and page dropping give references up
(``unref_pages``). ``plan_step``, ``kvjax.pressure.relieve`` and page
dropping call these, and tier demotion will too. Names in shapes: P =
num_pages, K = pages asked for.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.layout.meta import PageMeta
from kvjax.policies.adapter import events
from kvjax.policies.adapter import report
from kvjax.policies.adapter import scores
from kvjax.prefix.index import index_delete
from kvjax.prefix.index import placement_mix
from kvjax.prefix.index import PrefixIndex
ORPHAN = -2  # parent of a page whose parent page was reused: never matched again


def unref_pages(meta: PageMeta, pages: jax.Array) -> PageMeta:
  """Metadata after each entry of ``pages`` gives up one reference.

  A page left with no reference and no content hash becomes free (its fill, tokens and
  parent are reset); a hashed page stays cached at reference 0 until evicted.

  Args:
    meta: page metadata.
    pages: int32 [...] page ids, one reference each (out of range, e.g. P, = none).

  >>> from kvjax.layout.meta import init_meta
  >>> m = init_meta(2, 2).replace(ref_count=jnp.array([1, 2]), filled=jnp.array([2, 2]))
  >>> out = unref_pages(m, jnp.array([0, 1, 2]))
  >>> out.ref_count.tolist(), out.filled.tolist()
  ([0, 1], [0, 2])
  """
  ref = meta.ref_count.at[pages.reshape(-1)].add(-1, mode="drop")
  hashed = jnp.any(meta.block_hash != 0, axis=-1)
  freed = (ref == 0) & (meta.ref_count > 0) & ~hashed
  return meta.replace(
      ref_count=ref,
      filled=jnp.where(freed, 0, meta.filled),
      tokens=jnp.where(freed[:, None], -1, meta.tokens),
      parent=jnp.where(freed, -1, meta.parent),
  )



def eviction_scores(state: CacheState, clock: jax.Array, config: CacheConfig) -> jax.Array:
  """float32 [P]: the pool's eviction scores at ``clock`` (free pages +inf, cached pages by
  ``config.eviction`` with ``state.policy_params``, held pages -inf); higher is taken first."""
  return scores(state.policy, state.meta, clock, state.policy_params, config)


def cached(meta: PageMeta) -> jax.Array:
  """bool [P]: pages that hold an indexed block and no live reference (evictable content)."""
  return jnp.any(meta.block_hash != 0, axis=-1) & (meta.ref_count == 0)


def victims(state: CacheState, k: int, *, clock: jax.Array, config: CacheConfig,
            cached_only: bool = False) -> tuple[jax.Array, jax.Array]:
  """The ``k`` pages a step would take next, best first, and whether each may be taken.

  Free pages come first, then cached pages in the order of the cache's eviction
  policy (``config.eviction``, scored at ``clock``); a page some sequence holds is
  never one. With ``cached_only`` free pages are skipped (``relieve``: only a cached
  page's eviction frees memory).

  Returns:
    ``(pages int32 [k], ok bool [k])``; ``ok`` is a prefix (False where fewer than
    ``k`` pages qualify).

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=3, max_seqs=1, max_pages_per_seq=2)
  >>> _, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]),
  ...                         config=cfg)
  >>> pages, ok = victims(st, 3, clock=st.clock, config=cfg)
  >>> sorted(pages[:2].tolist()), ok.tolist()       # page 0 is held
  ([1, 2], [True, True, False])
  """
  meta = state.meta
  score = eviction_scores(state, clock, config)
  allowed = cached(meta) if cached_only else meta.ref_count == 0
  score = jnp.where(allowed, score, -jnp.inf)
  _, pages = jax.lax.top_k(score, k)
  ok = allowed[pages]
  return pages.astype(jnp.int32), jnp.cumsum(~ok) == 0


class Reclaimed(NamedTuple):
  """What ``reclaim`` did."""

  state: CacheState      # the cache with the pages emptied
  evicted: jax.Array     # bool [K]  the page held a cached block, now evicted
  block_hash: jax.Array  # uint32 [K, 2]  the evicted blocks' hashes ((0, 0) where not evicted)
  tokens: jax.Array      # int32 [K, S]  the evicted blocks' tokens (-1 where not evicted)


def reclaim(state: CacheState, pages: jax.Array, *, clock: jax.Array,
            config: CacheConfig) -> Reclaimed:
  """Empty ``pages`` for reuse: the one eviction path.

  Each page that held a cached block is evicted: the eviction policy is told
  (an ``evict`` event), ``stats.evictions`` counts it. Every page leaves the
  prefix index, its cached children are orphaned (never matched again; freed
  if nobody holds them), and its content record is cleared (no hash, no
  tokens, no fill, no parent). References are not touched: the caller either
  takes the page (``plan_step``) or leaves it free (``relieve``).

  Args:
    state: the cache.
    pages: int32 [K] pages to empty (P = none); none may be held by a sequence
      other than the caller's plan.
    clock: int32 [] the time of the eviction events.
    config: the cache's config.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> _, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1, 2]]),
  ...                         jnp.array([2]), config=cfg)
  >>> st = kvjax.release(st, jnp.array([0]), config=cfg)    # page 0 stays cached
  >>> out = reclaim(st, jnp.array([0, 2]), clock=st.clock, config=cfg)
  >>> out.evicted.tolist(), int(out.state.stats.evictions), out.state.meta.filled.tolist()
  ([True, False], 1, [0, 0])
  """
  meta = state.meta
  p_ = meta.ref_count.shape[0]
  real = pages < p_
  safe = jnp.clip(pages, 0, p_ - 1)
  evicted = real & cached(meta)[safe]
  block_hash = jnp.where(evicted[:, None], meta.block_hash[safe], jnp.uint32(0))
  tokens = jnp.where(evicted[:, None], meta.tokens[safe], -1)
  policy = report(state.policy, meta, events(
      jnp.where(evicted, pages, -1), None, clock, kind="evict", position=meta.position[safe],
      evicted_keys=block_hash), state.policy_params, config)
  index = state.index
  if config.prefix_caching:
    meta, index = forget_pages(meta, index, jnp.where(real, pages, p_))
  gone = jnp.where(real, pages, p_)
  meta = meta.replace(
      block_hash=meta.block_hash.at[gone].set(0, mode="drop"),
      tokens=meta.tokens.at[gone].set(-1, mode="drop"),
      filled=meta.filled.at[gone].set(0, mode="drop"),
      parent=meta.parent.at[gone].set(-1, mode="drop"))
  stats = state.stats.replace(evictions=state.stats.evictions
                              + jnp.sum(evicted).astype(jnp.int32))
  return Reclaimed(state.replace(meta=meta, index=index, policy=policy, stats=stats), evicted,
                   block_hash, tokens)


def grant(base_need: jax.Array, partial: jax.Array, last_page: jax.Array,
           eligible: jax.Array, available: jax.Array,
           ref_count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Greedy admission in batch order, with copy-on-write decided on the way.

  A row appending into a partial last page copies it when, at its turn, some
  other sequence still holds the page; the last holder writes in place. A row
  is granted when its pages (plus the copy) still fit.

  Returns:
    ``(granted, cow)``, bool [B] each.
  """
  p_ = ref_count.shape[0]

  def body(carry, x):
    remaining, holders = carry
    n, part, last, ok = x
    page = jnp.clip(last, 0, p_ - 1)
    cow = part & (holders[page] > 1)
    need = n + cow.astype(jnp.int32)
    take = ok & (need <= remaining)
    holders = holders.at[page].add(jnp.where(take & cow, -1, 0))
    return (remaining - jnp.where(take, need, 0), holders), (take, cow & take)

  _, (granted, cow) = jax.lax.scan(body, (available, ref_count),
                                   (base_need, partial, last_page, eligible))
  return granted, cow


def forget_pages(meta: PageMeta, index: PrefixIndex, pages: jax.Array) -> tuple[PageMeta,
                                                                                PrefixIndex]:
  """Pages about to get new content leave the index, and so do their cached children.

  Args:
    meta, index: page metadata and prefix index.
    pages: int32 [N] pages being reused (P = none).

  Returns:
    ``(meta, index)`` with those pages unhashed and their children orphaned.
  """
  p_ = meta.ref_count.shape[0]
  ok = pages < p_
  safe = jnp.clip(pages, 0, p_ - 1)
  mixed = placement_mix(index, meta.block_hash)   # every page's, once for both deletes
  index = index_delete(index, meta.block_hash[safe], ok, expected=safe,
                       mixed=tuple(w[safe] for w in mixed))
  reused = jnp.zeros((p_ + 1,), bool).at[pages].set(True, mode="drop")[:p_]
  child = (meta.parent >= 0) & reused[jnp.clip(meta.parent, 0, p_ - 1)] & ~reused
  hashed_child = child & jnp.any(meta.block_hash != 0, axis=-1)
  index = index_delete(index, meta.block_hash, hashed_child, expected=jnp.arange(p_),
                       mixed=mixed)
  unheld = child & (meta.ref_count == 0)  # an orphan nobody holds is free
  meta = meta.replace(
      block_hash=jnp.where(child[:, None], jnp.uint32(0), meta.block_hash),
      parent=jnp.where(child, ORPHAN, meta.parent),
      filled=jnp.where(unheld, 0, meta.filled),
  )
  return meta, index

