"""The page pool: the one module that takes, frees and evicts pages.

A page is *held* (``ref_count > 0``: some live sequence's page table names
it), *cached* (``ref_count == 0`` with a block hash: in the prefix index,
evictable) or *free* (``ref_count == 0``, no hash, ``filled == 0``). Every
transition goes through here: ``plan_step`` takes pages (``take``), ``release``
and page dropping give references up (``unref_pages``), ``relieve`` and
``plan_step`` evict cached pages (``evict``), and an evicted page's index
entry and its cached children's leave with it (``forget_pages``). Names in
shapes: P = num_pages.
"""

from __future__ import annotations

from kvjax.layout.meta import PageMeta
from kvjax.policies.adapter import scores
from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.prefix.index import PrefixIndex
from kvjax.prefix.index import index_delete
import jax
import jax.numpy as jnp
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
  """float32 [P] eviction scores of the pool (``scores``, with ``state.policy_params``)."""
  return scores(state.policy, state.meta, clock, state.policy_params, config)


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
  index = index_delete(index, meta.block_hash[safe], ok, expected=safe)
  reused = jnp.zeros((p_ + 1,), bool).at[pages].set(True, mode="drop")[:p_]
  child = (meta.parent >= 0) & reused[jnp.clip(meta.parent, 0, p_ - 1)] & ~reused
  hashed_child = child & jnp.any(meta.block_hash != 0, axis=-1)
  index = index_delete(index, meta.block_hash, hashed_child, expected=jnp.arange(p_))
  unheld = child & (meta.ref_count == 0)  # an orphan nobody holds is free
  meta = meta.replace(
      block_hash=jnp.where(child[:, None], jnp.uint32(0), meta.block_hash),
      parent=jnp.where(child, ORPHAN, meta.parent),
      filled=jnp.where(unheld, 0, meta.filled),
  )
  return meta, index


ORPHAN = -2  # parent of a page whose parent page was reused: never matched again
