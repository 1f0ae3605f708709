"""Sequence lifecycle: ``release`` ends sequences, ``fork`` starts copies that share pages.

Both go through the pool (``kvjax.cache.pool``) for every reference they give
up; neither copies K/V (a fork's first write into a shared partial page does).
A cache in page-dropping mode (``state.drop``, ``kvjax.drop.enable``) keeps its
per-sequence ``DropState`` rows in step: released rows are cleared, forked rows
copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.checks import as_int32
from kvjax.cache.checks import check_state
from kvjax.cache.checks import dedupe
from kvjax.cache.config import CacheConfig
from kvjax.cache.pool import unref_pages
from kvjax.cache.state import CacheState
from kvjax.cache.state import DropState
from kvjax.cache.status import BAD_INPUT
from kvjax.cache.status import enforce_checked
from kvjax.cache.status import jit_when_eager
from kvjax.cache.status import NON_FINITE
from kvjax.cache.status import OUT_OF_RANGE


def _clear_drop(drop: DropState, rows: jax.Array) -> DropState:
  """``drop`` with rows ``rows`` (int32 [N], B = none) reset: no mass, nothing dropped."""
  return drop.replace(
      mass=drop.mass.at[rows].set(0.0, mode="drop"),
      seen=drop.seen.at[rows].set(0.0, mode="drop"),
      owner=drop.owner.at[rows].set(-1, mode="drop"),
      dropped=drop.dropped.at[rows].set(0, mode="drop"))


def _copy_drop(drop: DropState, src: jax.Array, rows: jax.Array) -> DropState:
  """``drop`` with rows ``rows`` (int32 [N], B = none) copied from rows ``src`` [N]."""
  return drop.replace(
      mass=drop.mass.at[rows].set(drop.mass[src], mode="drop"),
      seen=drop.seen.at[rows].set(drop.seen[src], mode="drop"),
      owner=drop.owner.at[rows].set(drop.owner[src], mode="drop"),
      dropped=drop.dropped.at[rows].set(drop.dropped[src], mode="drop"))


@jit_when_eager("config")
def release(state: CacheState, seq_ids: jax.Array, *, config: CacheConfig) -> CacheState:
  """End sequences: their pages lose a reference; the slots become empty.

  Pages left with no reference and no content hash become free; hashed pages
  stay cached (reference 0) until evicted. The slots' namespaces and flags
  (``seq_status``) are reset, and so are their page-dropping rows (mass,
  owners, tokens dropped) in drop mode. Ids of -1 (padding), repeats and empty
  slots are no-ops; an id out of range flags ``BAD_INPUT`` (``config.checked``
  raises on an eager call).

  Args:
    state: the cache.
    seq_ids: int [N] sequence slots to release.
    config: the cache's config; the state is checked against it.

  Returns:
    The updated state.

  >>> from kvjax.cache.plan import plan_step
  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> _, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]), config=cfg)
  >>> int(release(st, jnp.array([0]), config=cfg).meta.ref_count.sum())
  0
  """
  check_state(state, config)
  seq_ids = as_int32("seq_ids", seq_ids, 1)
  max_seqs, p_ = state.page_table.shape[0], state.meta.ref_count.shape[0]
  ok = dedupe(seq_ids, max_seqs)
  out_of_range = (seq_ids != -1) & ((seq_ids < 0) | (seq_ids >= max_seqs))
  rows = jnp.where(ok, seq_ids, max_seqs)
  table = state.page_table[jnp.clip(rows, 0, max_seqs - 1)]
  held = jnp.where(ok[:, None] & (table >= 0), table, p_)
  meta = unref_pages(state.meta, held)
  fold_floor = state.fold_floor
  if fold_floor is not None:
    fold_floor = fold_floor.at[rows].set(0, mode="drop")
  new_state = state.replace(
      meta=meta,
      page_table=state.page_table.at[rows].set(-1, mode="drop"),
      seq_lens=state.seq_lens.at[rows].set(0, mode="drop"),
      seq_seed=state.seq_seed.at[rows].set(0, mode="drop"),
      seq_status=state.seq_status.at[rows].set(0, mode="drop"),
      status=state.status | jnp.where(jnp.any(out_of_range), BAD_INPUT,
                                      0).astype(jnp.int32),
      fold_floor=fold_floor,
  )
  if state.drop is not None:
    new_state = new_state.replace(drop=_clear_drop(state.drop, rows))
  return enforce_checked(new_state, config)


@jit_when_eager("config")
def fork(state: CacheState, src_ids: jax.Array, dst_ids: jax.Array, *,
         config: CacheConfig) -> CacheState:
  """Start sequences ``dst_ids`` as copies of ``src_ids`` that share their pages.

  Nothing is copied now: every page gains a reference, and the first write
  into a shared partial last page copies it (``plan_step`` plans the copy,
  ``write`` makes it). With staging (quantized pages folded from a ring), the
  source's ring row, which holds its unfolded pages, is copied to the
  destination's now. A pair is skipped and ``BAD_INPUT`` is flagged when the
  destination is not empty, ids are out of range, the source is empty, or an
  id repeats. The copy inherits the source's namespace and its data flags
  (``NON_FINITE``, ``OUT_OF_RANGE``: it shares those K/V), and in drop mode
  its page-dropping rows (mass, owners, tokens dropped: the same pages at the
  same logical positions).

  Args:
    state: the cache.
    src_ids: int [N] sequences to copy.
    dst_ids: int [N] empty sequence slots to fill.
    config: the cache's config; the state is checked against it and
      ``config.checked`` raises on a skipped pair (eager calls).

  Returns:
    The updated state.

  >>> from kvjax.cache.plan import plan_step
  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=2, max_pages_per_seq=2)
  >>> _, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]), config=cfg)
  >>> fork(st, jnp.array([0]), jnp.array([1]), config=cfg).meta.ref_count.tolist()
  [2, 0]
  """
  check_state(state, config)
  src_ids, dst_ids = as_int32("src_ids", src_ids, 1), as_int32("dst_ids", dst_ids, 1)
  if src_ids.shape != dst_ids.shape:
    raise ValueError(f"src_ids and dst_ids must have the same shape, got {tuple(src_ids.shape)} "
                     f"and {tuple(dst_ids.shape)}")
  ms, p_ = state.page_table.shape[0], state.meta.ref_count.shape[0]
  in_range = (src_ids >= 0) & (src_ids < ms) & (dst_ids >= 0) & (dst_ids < ms)
  # Destinations must be distinct and not be a source of this batch.
  dst_repeats = ~dedupe(dst_ids, ms) | jnp.any(dst_ids[:, None] == src_ids[None, :], axis=1)
  src_safe, dst_safe = jnp.clip(src_ids, 0, ms - 1), jnp.clip(dst_ids, 0, ms - 1)
  dst_empty = (state.seq_lens[dst_safe] == 0) & jnp.all(state.page_table[dst_safe] < 0, axis=1)
  src_live = state.seq_lens[src_safe] > 0
  ok = in_range & ~dst_repeats & dst_empty & src_live
  padding = (src_ids == -1) & (dst_ids == -1)
  bad = ~ok & ~padding
  table = state.page_table[src_safe]
  held = jnp.where(ok[:, None] & (table >= 0), table, p_)
  meta = state.meta
  meta = meta.replace(
      ref_count=meta.ref_count.at[held.reshape(-1)].add(1, mode="drop"),
      access_count=meta.access_count.at[held.reshape(-1)].add(1, mode="drop"),
  )
  rows = jnp.where(ok, dst_ids, ms)
  status = state.status | jnp.where(jnp.any(bad), BAD_INPUT, 0)
  if state.fold_floor is not None:   # staging: the destination gets a copy of the source's ring
    copy_ring = lambda p: p.replace(  # noqa: E731
        stage=p.stage.at[:, rows].set(p.stage[:, src_safe], mode="drop"))
    state = state.replace(k=copy_ring(state.k), v=copy_ring(state.v),
                          fold_floor=state.fold_floor.at[rows].set(
                              state.fold_floor[src_safe], mode="drop"))
  if state.k.sink is not None:   # and of its sink rows
    copy_sink = lambda p: p.replace(  # noqa: E731
        sink=p.sink.at[:, rows].set(p.sink[:, src_safe], mode="drop"))
    state = state.replace(k=copy_sink(state.k), v=copy_sink(state.v))
  new_state = state.replace(
      meta=meta,
      page_table=state.page_table.at[rows].set(table, mode="drop"),
      seq_lens=state.seq_lens.at[rows].set(state.seq_lens[src_safe], mode="drop"),
      seq_seed=state.seq_seed.at[rows].set(state.seq_seed[src_safe], mode="drop"),
      seq_status=state.seq_status.at[rows].set(
          state.seq_status[src_safe] & (NON_FINITE | OUT_OF_RANGE),
          mode="drop"),
      status=status.astype(jnp.int32),
  )
  if state.drop is not None:
    new_state = new_state.replace(drop=_copy_drop(state.drop, src_safe, rows))
  return enforce_checked(new_state, config)
