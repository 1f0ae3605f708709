"""Write one layer's new K or V into the slots a ``StepPlan`` gave them.

Unquantized pages are scattered into; token-axis specs quantize each token into
its slot; specs that stage (a channel axis or a residual window) go through the
per-sequence ring and fold pages as they become due. Shapes: B = batch rows,
T = new tokens per row, H = kv heads, D = head_dim.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.cache.plan import StepPlan
from kvjax.layout.pages import as_stored
from kvjax.layout.pages import check_layer
from kvjax.layout.pages import head_dim_of
from kvjax.layout.pages import Pages
from kvjax.layout.pages import pool_only
from kvjax.layout.pages import scatter_rows
from kvjax.quant.pages import copy_pages
from kvjax.quant.pages import write_tokens
from kvjax.quant.staging import stage_and_fold


def sink_rows(pages: Pages, plan: StepPlan) -> Optional[jax.Array]:
  """The sink rows of the plan's batch rows: ``[B, N, H, D]`` (None without a sink)."""
  if pages.sink is None:
    return None
  return pages.sink[jnp.clip(plan.seq_ids, 0, pages.sink.shape[0] - 1)]


def _write_sink(new: Pages, old: Pages, plan: StepPlan, x: jax.Array) -> Pages:
  """``new`` with the step's tokens at positions ``< N`` also stored in ``old``'s sink rows."""
  if old.sink is None:
    return new
  b_, n = old.sink.shape[:2]
  take = plan.valid & (plan.positions < n) & (plan.seq_ids[:, None] >= 0)     # [B, T]
  row = jnp.where(take, plan.seq_ids[:, None], b_)                            # b_ = dropped
  sink = old.sink.at[row, jnp.clip(plan.positions, 0, n - 1)].set(
      x.astype(old.sink.dtype), mode="drop")
  return new.replace(sink=sink)


def stage_rows(pages: Pages, plan: StepPlan) -> Optional[jax.Array]:
  """The staging ring rows of the plan's batch rows: ``[B, NS, S, H, D]`` (None without)."""
  if pages.stage is None:
    return None
  return pages.stage[jnp.clip(plan.seq_ids, 0, pages.stage.shape[0] - 1)]


def lens_before(plan: StepPlan) -> tuple[jax.Array, jax.Array]:
  """``(kv_lens before this step, new tokens written)``, int32 [B] each."""
  num_new = jnp.sum(plan.valid, axis=1).astype(jnp.int32)
  return plan.kv_lens - num_new, num_new


def write(pages: Pages, plan: StepPlan, x: jax.Array) -> Pages:
  """Write one layer's new K (or V) into the slots of ``plan``.

  Shared partial pages marked by the plan are copied first (copy on write).
  For a prefill chunk (T > 1) through a staging ring, the pages returned also
  carry the step's tokens and the ring before the step (``Pages.written``,
  ``Pages.ring_before``): ``attend`` on them then gives exactly what
  ``write_attend`` gives. Put them back into the cache with
  ``with_layer_pages`` (or ``kvjax.layout.as_stored``), which drops those.

  Args:
    pages: one layer's ``Pages`` (data ``[P, S, H, D]``).
    plan: the step's plan.
    x: ``[B, T, H, D]`` new keys or values.

  Returns:
    The layer's updated ``Pages`` (one layer, as ``pages``).

  >>> from kvjax.cache.plan import plan_step
  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> plan, st = plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]), config=cfg)
  >>> layer = jax.tree.map(lambda a: a[0], st.k)
  >>> write(layer, plan, jnp.ones((1, 1, 1, 2))).data[0, 0].tolist()
  [[1.0, 1.0]]
  """
  check_layer("pages", pages)
  pages = as_stored(pages)
  p_, s_, h_, _ = pages.data.shape
  d_ = head_dim_of(pages)
  b, t = plan.slots.shape
  if x.shape != (b, t, h_, d_):
    raise ValueError(f"x must have shape (B, T, H, D) = {(b, t, h_, d_)} from plan and pages, "
                     f"got {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got dtype {x.dtype}")
  if pages.stage is not None:
    new = _write_sink(_write_staged(pages, plan, x), pages, plan, x)
    if t == 1:   # decode: attend reads the ring and pool as they are now
      return new
    return new.replace(written=x.astype(pages.stage.dtype), ring_before=stage_rows(pages, plan))
  if pages.spec.is_quantized:   # token-axis spec, no window: quantize each token into its slot
    pool = copy_pages(pages, plan.cow_src, jnp.where(plan.cow_dst < p_, plan.cow_dst, -1))
    pool = write_tokens(pool, plan.slots.reshape(-1), x.reshape(b * t, h_, d_), pages.spec)
    return _write_sink(pool, pages, plan, x)
  data = pages.data
  data = scatter_rows(data, plan.cow_dst, data[jnp.clip(plan.cow_src, 0, p_ - 1)])
  flat = scatter_rows(data.reshape(p_ * s_, h_, d_), plan.slots, x.reshape(b * t, h_, d_))
  return _write_sink(pages.replace(data=flat.reshape(p_, s_, h_, d_)), pages, plan, x)


def _write_staged(pages: Pages, plan: StepPlan, x: jax.Array) -> Pages:
  """``write`` through the staging ring: fold the pages that become due, stage the rest.

  The partial page of a sequence is always staged, so copy on write needs no
  pool copy: the ring row is the sequence's own (``fork`` copied it). New
  tokens are rounded to the ring's dtype first, so a page's folded codes do
  not depend on how the tokens were chunked.
  """
  n0, num_new = lens_before(plan)
  rows = stage_rows(pages, plan)
  x = x.astype(pages.stage.dtype)
  pool, rows = stage_and_fold(pool_only(pages), rows, plan.page_table, n0, x, num_new,
                                    pages.spec, residual=pages.residual, floor=plan.fold_floor)
  b_ = pages.stage.shape[0]
  dst = jnp.where(num_new > 0, plan.seq_ids, b_)     # rows with no new token keep their ring
  return pool.replace(stage=pages.stage.at[dst].set(rows, mode="drop"))
