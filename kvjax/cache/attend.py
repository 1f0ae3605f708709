"""Paged attention over one layer's pages, dequantizing quantized pages.

Unquantized pages take the jnp path below. Quantized pages take
``kvjax.kernels.ops.paged_attention`` for decode (T = 1: Pallas on GPU/TPU,
the jnp reference on CPU) and dense dequantized K/V for prefill chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.kernels import ops
from kvjax.kernels.paged_attention import gather_dequantized
from kvjax.rope import rope
from kvjax.cache.plan import StepPlan
from kvjax.cache.write import lens_before
from kvjax.cache.write import sink_rows
from kvjax.cache.write import stage_rows
from kvjax.cache.write import write
from kvjax.layout.pages import Pages
from kvjax.layout.pages import check_layer
from kvjax.layout.pages import head_dim_of
from kvjax.layout.pages import pool_only
from kvjax.layout.shapes import first_staged_page


def attend(q: jax.Array, k_pages: Pages, v_pages: Pages, plan: StepPlan, *,
           with_mass: bool = False):
  """Attention of this step's queries over the pages of their sequences.

  Causal: the query at absolute position p sees keys at positions <= p, among
  the ``plan.kv_lens[b]`` tokens of its sequence (so inside a prefill chunk
  each token sees the earlier ones). Grouped-query: query head ``i`` reads kv
  head ``i // (Hq // H)``. Computed in float32; softmax scale ``1/sqrt(D)``.
  Rows with nothing to read (padding, refused empty sequences) give zeros.

  Quantized pages (their static ``spec``) are dequantized: pages folded by
  ``kv_lens`` are read from the pool, the rest from the staging ring. For a
  prefill chunk (T > 1) with staging, every query of the chunk sees the pages
  folded by the end of the step quantized; ``write_attend`` gives the causal
  view (each query sees what decode would show it).

  Args:
    q: ``[B, T, Hq, D]`` queries (after RoPE), Hq a multiple of H.
    k_pages / v_pages: one layer's ``Pages`` (data ``[P, S, H, *]``), already
      holding this step's K/V (``write`` first).
    plan: the step's plan.
    with_mass: static; also return each page's attention probability mass
      (for ``kvjax.drop``). Off, the computation is unchanged.

  Returns:
    ``[B, T, Hq, D]`` in q's dtype; with ``with_mass``, ``(out, mass)`` where
    ``mass`` is float32 ``[B, M]``: the softmax weight each page-table column
    received, summed over query heads and the row's valid queries (a decode
    row sums to Hq). Quantized pages are read dequantized and dense then.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> plan, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]),
  ...                            jnp.array([1]), config=cfg)
  >>> k = kvjax.write(jax.tree.map(lambda a: a[0], st.k), plan, jnp.ones((1, 1, 1, 2)))
  >>> v = kvjax.write(jax.tree.map(lambda a: a[0], st.v), plan, 3 * jnp.ones((1, 1, 1, 2)))
  >>> attend(jnp.ones((1, 1, 1, 2)), k, v, plan).tolist()
  [[[[3.0, 3.0]]]]
  >>> attend(jnp.ones((1, 1, 1, 2)), k, v, plan, with_mass=True)[1].tolist()
  [[1.0, 0.0]]
  """
  _check_pair(q, k_pages, v_pages, plan)
  if with_mass:
    return _attend_with_mass(q, k_pages, v_pages, plan)
  if (k_pages.spec.is_quantized or v_pages.spec.is_quantized or k_pages.stage is not None
      or k_pages.sink is not None or k_pages.rope_base):
    return _attend_quantized(q, k_pages, v_pages, plan)
  _, s_, h_, d_ = k_pages.data.shape
  b = plan.positions.shape[0]
  m_ = plan.page_table.shape[1]
  table = jnp.maximum(plan.page_table, 0)
  k = k_pages.data[table].reshape(b, m_ * s_, h_, d_)                # [B, K, H, D]
  v = v_pages.data[table].reshape(b, m_ * s_, h_, d_)
  return grouped_attention(q, k, v, _visible(plan, m_ * s_))


def _attend_with_mass(q, k_pages: Pages, v_pages: Pages, plan: StepPlan):
  """``attend`` plus float32 [B, M] per-page attention mass (dense keys, any spec)."""
  if k_pages.stage is not None:
    raise ValueError("attend(with_mass=True) does not support pages with a staging ring")
  if k_pages.rope_base:
    raise ValueError("attend(with_mass=True) does not support keys stored before RoPE")
  s_ = k_pages.data.shape[1]
  b, m_ = plan.page_table.shape
  if k_pages.spec.is_quantized or v_pages.spec.is_quantized:
    k, v = _dense(k_pages, plan), _dense(v_pages, plan)
  else:
    table = jnp.maximum(plan.page_table, 0)
    k = k_pages.data[table].reshape(b, m_ * s_, *k_pages.data.shape[2:])
    v = v_pages.data[table].reshape(b, m_ * s_, *v_pages.data.shape[2:])
  out, mass = grouped_attention(q, k, v, _visible(plan, m_ * s_), with_mass=True)
  mass = jnp.sum(jnp.where(plan.valid[:, :, None], mass, 0.0), axis=1)       # [B, K]
  return out, jnp.sum(mass.reshape(b, m_, s_), axis=-1)


def _visible(plan: StepPlan, kn: int) -> jax.Array:
  """bool [B, T, K]: key position < kv_len and <= the query's position."""
  key_pos = jnp.arange(kn)
  return ((key_pos[None, None, :] < plan.kv_lens[:, None, None])
          & (key_pos[None, None, :] <= plan.positions[:, :, None]))


def _check_pair(q, k_pages: Pages, v_pages: Pages, plan: StepPlan) -> None:
  check_layer("k_pages", k_pages)
  check_layer("v_pages", v_pages)
  kd, vd = head_dim_of(k_pages), head_dim_of(v_pages)
  if k_pages.data.shape[:3] != v_pages.data.shape[:3] or kd != vd:
    raise ValueError(f"k_pages and v_pages differ in shape: {tuple(k_pages.data.shape)} vs "
                     f"{tuple(v_pages.data.shape)}")
  if (k_pages.stage is None) != (v_pages.stage is None):
    raise ValueError("k_pages and v_pages must both have a staging ring or neither")
  if (k_pages.sink is None) != (v_pages.sink is None):
    raise ValueError("k_pages and v_pages must both have sink rows or neither")
  _, s_, h_, _ = k_pages.data.shape
  d_ = kd
  b, t = plan.positions.shape
  if not jnp.issubdtype(jnp.asarray(q).dtype, jnp.floating):
    raise ValueError(f"q must be floating point, got dtype {jnp.asarray(q).dtype}")
  if q.ndim != 4 or q.shape[0] != b or q.shape[1] != t or q.shape[3] != d_:
    raise ValueError(f"q must have shape (B, T, Hq, D) with (B, T) = {(b, t)} from the plan and "
                     f"D = {d_} from the pages, got {tuple(q.shape)}")
  hq = q.shape[2]
  if hq % h_:
    raise ValueError(f"q heads ({hq}) must be a multiple of the kv heads ({h_})")


def _dense(pages: Pages, plan: StepPlan, *, staged: bool = True) -> jax.Array:
  """float32 [B, M*S, H, D]: each row's K (or V) dequantized; ring pages from the ring;
  keys stored before RoPE rotated by their positions."""
  stage = stage_rows(pages, plan) if staged else None
  x = gather_dequantized(pool_only(pages), pages.spec, plan.page_table, plan.kv_lens,
                         stage, pages.residual, sink=sink_rows(pages, plan))
  if pages.rope_base:
    pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    x = rope(x, pos, pages.rope_base)
  return x


def _attend_quantized(q, k_pages: Pages, v_pages: Pages, plan: StepPlan) -> jax.Array:
  b, t = plan.positions.shape
  if t == 1:   # decode: the fused kernel where it runs (GPU/TPU), its jnp reference on CPU
    out = ops.paged_attention(q[:, 0], pool_only(k_pages), pool_only(v_pages),
                              plan.page_table, plan.kv_lens, k_pages.spec, v_pages.spec,
                              k_stage=stage_rows(k_pages, plan), v_stage=stage_rows(v_pages, plan),
                              k_sink=sink_rows(k_pages, plan), v_sink=sink_rows(v_pages, plan),
                              k_rope=k_pages.rope_base)
    return out[:, None].astype(q.dtype)
  k, v = _dense(k_pages, plan), _dense(v_pages, plan)
  return grouped_attention(q, k, v, _visible(plan, k.shape[1]))


def write_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: Pages, v_pages: Pages,
                 plan: StepPlan, *, with_mass: bool = False) -> tuple:
  """``write`` this step's K and V, then attend: the model's per-layer data path.

  Same as ``write`` then ``attend``, except for a prefill chunk (T > 1) through
  a staging ring, where it keeps attention causal: the query at position p
  sees page j quantized iff ``(j + 1) * S + R <= p + 1`` (R the window), i.e.
  exactly what a decode step at p sees, whatever the chunking. Pages that fold
  during the chunk are read in full precision (the ring before the step and
  the new tokens, rounded to the ring dtype) by the queries before their fold.

  Args:
    q: ``[B, T, Hq, D]``; k, v: ``[B, T, H, D]`` this step's keys (after RoPE)
      and values.
    k_pages / v_pages: one layer's ``Pages`` before the step.
    plan: the step's plan.
    with_mass: static; also return ``attend``'s per-page mass (no staging ring).

  Returns:
    ``(out [B, T, Hq, D] in q's dtype, k_pages, v_pages)``; with ``with_mass``,
    ``(out, k_pages, v_pages, mass float32 [B, M])``.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> plan, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]),
  ...                            jnp.array([1]), config=cfg)
  >>> layer = lambda p: jax.tree.map(lambda a: a[0], p)
  >>> x = jnp.ones((1, 1, 1, 2))
  >>> write_attend(x, x, 3 * x, layer(st.k), layer(st.v), plan)[0].tolist()
  [[[[3.0, 3.0]]]]
  """
  k_new, v_new = write(k_pages, plan, k), write(v_pages, plan, v)
  if with_mass:
    out, mass = attend(q, k_new, v_new, plan, with_mass=True)
    return out, k_new, v_new, mass
  if k_pages.stage is None or plan.positions.shape[1] == 1:
    return attend(q, k_new, v_new, plan), k_new, v_new
  _check_pair(q, k_new, v_new, plan)
  s_ = k_pages.data.shape[1]
  n0, _ = lens_before(plan)
  before = plan.replace(kv_lens=n0)
  rows = jnp.arange(plan.positions.shape[0])[:, None]

  def views(before_pages, after_pages, x):
    # full precision: the ring and pool before the step, then this step's tokens
    full = _dense(before_pages, before)
    x = x.astype(before_pages.stage.dtype).astype(jnp.float32)
    if before_pages.rope_base:   # keys stored before RoPE: the full view rotates them too
      x = rope(x, plan.positions, before_pages.rope_base)
    dst = jnp.where(plan.valid, plan.positions, full.shape[1])        # [B, T], K = dropped
    full = full.at[rows, dst].set(x, mode="drop")
    return _dense(after_pages, plan, staged=False), full               # quantized, full

  kq, kf = views(k_pages, k_new, k)
  vq, vf = views(v_pages, v_new, v)
  kn = kq.shape[1]
  folded = first_staged_page(plan.positions + 1, k_pages.residual, s_)   # [B, T]
  quantized = (jnp.arange(kn)[None, None, :] // s_) < folded[:, :, None]       # [B, T, K]
  out = _two_view_attention(q, (kq, vq), (kf, vf), quantized, _visible(plan, kn))
  return out, k_new, v_new


def _two_view_attention(q, quant_kv, full_kv, quantized, visible) -> jax.Array:
  """Grouped attention where each (query, key) reads the quantized or the full view.

  Values a view gives to no query of the row are selected to 0 first (see
  ``grouped_attention`` for what that guarantees inside a chunk).
  """
  b, t, hq, d_ = q.shape
  kq, vq = quant_kv
  kf, vf = full_kv
  kn, h_ = kq.shape[1], kq.shape[2]
  g = hq // h_
  qh = q.astype(jnp.float32).reshape(b, t, h_, g, d_).transpose(0, 2, 3, 1, 4)
  qh = qh.reshape(b * h_, g * t, d_)
  heads = lambda a: a.transpose(0, 2, 1, 3).reshape(b * h_, kn, d_)  # noqa: E731
  expand = lambda m: jnp.broadcast_to(m[:, None, None], (b, h_, g, t, kn)).reshape(  # noqa: E731
      b * h_, g * t, kn)
  sel = expand(quantized)
  # a key no query of the row reads in a view contributes nothing from it (select, not 0 * v)
  vq = _select_read(vq, visible & quantized)
  vf = _select_read(vf, visible & ~quantized)
  lq = jnp.einsum("xqd,xkd->xqk", qh, heads(kq))
  lf = jnp.einsum("xqd,xkd->xqk", qh, heads(kf))
  logits = jnp.where(sel, lq, lf) * (d_ ** -0.5)
  logits = jnp.where(expand(visible), logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  out = (jnp.einsum("xqk,xkd->xqd", jnp.where(sel, weights, 0.0), heads(vq))
         + jnp.einsum("xqk,xkd->xqd", jnp.where(sel, 0.0, weights), heads(vf)))
  out = out.reshape(b, h_, g, t, d_).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d_)
  return out.astype(q.dtype)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
                      with_mass: bool = False):
  """Masked grouped-query attention over contiguous keys (float32 inside).

  One batched matmul per (row, kv head) over all ``G * T`` queries of its
  group: on CPU this runs 2-3x faster than a 5-d einsum.

  Masked keys contribute exactly nothing, whatever they hold: their scores are
  selected to ``-inf`` and the values of keys that no query of the row sees are
  selected to 0 before the weighted sum (weight 0 times a NaN or inf value
  would be NaN). So another sequence's pages, stale slots, page 0 read for
  unused page-table columns and padding never reach a row's output, and a
  non-finite value can only reach the queries of the row that holds it.

  Inside a row the select is per row, not per query: with causal masking in a
  prefill chunk, a value at chunk token j is seen by the row's queries at j and
  later, and the earlier queries still multiply it by weight 0. A non-finite
  value there (a token of this row computed in this step) can therefore reach
  the row's earlier queries, never another row. Exactness per query would take
  a ``[T, K] x [K, H*D]`` mask product per row (1/G of the value matmul) on
  every prefill for a row that is already corrupt; for T = 1 (decode) the
  row select is per query.

  Args:
    q: ``[B, T, Hq, D]``; k, v: ``[B, K, H, D]`` with Hq a multiple of H.
    visible: bool ``[B, T, K]``, which keys each query may read.
    with_mass: static; also return the softmax weights summed over query heads.

  Returns:
    ``[B, T, Hq, D]`` in q's dtype; a query that sees no key gives zeros. With
    ``with_mass``, ``(out, mass)``, mass float32 ``[B, T, K]``.

  >>> x = jnp.ones((1, 2, 2, 4))
  >>> grouped_attention(x, x[:, :, :1], x[:, :, :1], jnp.tril(jnp.ones((1, 2, 2), bool))).shape
  (1, 2, 2, 4)
  >>> v = x[:, :, :1].at[0, 1].set(jnp.nan)            # a masked key holding NaN
  >>> grouped_attention(x[:, :1], x[:, :, :1], v, jnp.array([[[True, False]]]))[0, 0, 0].tolist()
  [1.0, 1.0, 1.0, 1.0]
  """
  b, t, hq, d_ = q.shape
  kn, h_ = k.shape[1], k.shape[2]
  g = hq // h_
  qh = q.astype(jnp.float32).reshape(b, t, h_, g, d_).transpose(0, 2, 3, 1, 4)
  qh = qh.reshape(b * h_, g * t, d_)
  kt = k.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h_, kn, d_)
  vt = _select_read(v.astype(jnp.float32), visible).transpose(0, 2, 1, 3).reshape(
      b * h_, kn, d_)
  logits = jnp.einsum("xqd,xkd->xqk", qh, kt) * (d_ ** -0.5)
  mask = jnp.broadcast_to(visible[:, None, None], (b, h_, g, t, kn)).reshape(b * h_, g * t, kn)
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("xqk,xkd->xqd", weights, vt)
  out = out.reshape(b, h_, g, t, d_).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d_)
  if with_mass:
    return out.astype(q.dtype), jnp.sum(weights.reshape(b, h_ * g, t, kn), axis=1)
  return out.astype(q.dtype)


def _select_read(v: jax.Array, visible: jax.Array) -> jax.Array:
  """``v [B, K, H, D]`` with 0 at the keys that no query of the row sees (``visible
  [B, T, K]``): a select, so a NaN or inf there cannot leak through a weight of 0."""
  read = jnp.any(visible, axis=1)                                      # [B, K]
  return jnp.where(read[:, :, None, None], v, jnp.zeros((), v.dtype))
