"""Paged attention over one layer's pages (pure jnp)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.paging import StepPlan
from kvjax.paging import _check_pages_layer
from kvjax.state import Pages


def attend(q: jax.Array, k_pages: Pages, v_pages: Pages, plan: StepPlan) -> jax.Array:
  """Attention of this step's queries over the pages of their sequences.

  Causal: the query at absolute position p sees keys at positions <= p, among
  the ``plan.kv_lens[b]`` tokens of its sequence (so inside a prefill chunk
  each token sees the earlier ones). Grouped-query: query head ``i`` reads kv
  head ``i // (Hq // H)``. Computed in float32; softmax scale ``1/sqrt(D)``.
  Rows with nothing to read (padding, refused empty sequences) give zeros.

  Args:
    q: ``[B, T, Hq, D]`` queries (after RoPE), Hq a multiple of H.
    k_pages / v_pages: one layer's ``Pages`` (data ``[P, S, H, D]``), already
      holding this step's K/V (``write`` first).
    plan: the step's plan.

  Returns:
    ``[B, T, Hq, D]`` in q's dtype.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=2, max_seqs=1, max_pages_per_seq=2)
  >>> plan, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]),
  ...                            jnp.array([1]), config=cfg)
  >>> k = kvjax.write(jax.tree.map(lambda a: a[0], st.k), plan, jnp.ones((1, 1, 1, 2)))
  >>> v = kvjax.write(jax.tree.map(lambda a: a[0], st.v), plan, 3 * jnp.ones((1, 1, 1, 2)))
  >>> attend(jnp.ones((1, 1, 1, 2)), k, v, plan).tolist()
  [[[[3.0, 3.0]]]]
  """
  _check_pages_layer("k_pages", k_pages)
  _check_pages_layer("v_pages", v_pages)
  if k_pages.data.shape != v_pages.data.shape:
    raise ValueError(f"k_pages and v_pages differ in shape: {tuple(k_pages.data.shape)} vs "
                     f"{tuple(v_pages.data.shape)}")
  _, s_, h_, d_ = k_pages.data.shape
  b, t = plan.positions.shape
  if q.ndim != 4 or q.shape[0] != b or q.shape[1] != t or q.shape[3] != d_:
    raise ValueError(f"q must have shape (B, T, Hq, D) with (B, T) = {(b, t)} from the plan and "
                     f"D = {d_} from the pages, got {tuple(q.shape)}")
  hq = q.shape[2]
  if hq % h_:
    raise ValueError(f"q heads ({hq}) must be a multiple of the kv heads ({h_})")
  m_ = plan.page_table.shape[1]
  table = jnp.maximum(plan.page_table, 0)
  k = k_pages.data[table].reshape(b, m_ * s_, h_, d_)                # [B, K, H, D]
  v = v_pages.data[table].reshape(b, m_ * s_, h_, d_)
  key_pos = jnp.arange(m_ * s_)
  visible = ((key_pos[None, None, :] < plan.kv_lens[:, None, None])
             & (key_pos[None, None, :] <= plan.positions[:, :, None]))  # [B, T, K]
  return grouped_attention(q, k, v, visible)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
  """Masked grouped-query attention over contiguous keys (float32 inside).

  One batched matmul per (row, kv head) over all ``G * T`` queries of its
  group: on CPU this runs 2-3x faster than a 5-d einsum.

  Args:
    q: ``[B, T, Hq, D]``; k, v: ``[B, K, H, D]`` with Hq a multiple of H.
    visible: bool ``[B, T, K]``, which keys each query may read.

  Returns:
    ``[B, T, Hq, D]`` in q's dtype; a query that sees no key gives zeros.

  >>> x = jnp.ones((1, 2, 2, 4))
  >>> grouped_attention(x, x[:, :, :1], x[:, :, :1], jnp.tril(jnp.ones((1, 2, 2), bool))).shape
  (1, 2, 2, 4)
  """
  b, t, hq, d_ = q.shape
  kn, h_ = k.shape[1], k.shape[2]
  g = hq // h_
  qh = q.astype(jnp.float32).reshape(b, t, h_, g, d_).transpose(0, 2, 3, 1, 4)
  qh = qh.reshape(b * h_, g * t, d_)
  kt = k.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h_, kn, d_)
  vt = v.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h_, kn, d_)
  logits = jnp.einsum("xqd,xkd->xqk", qh, kt) * (d_ ** -0.5)
  mask = jnp.broadcast_to(visible[:, None, None], (b, h_, g, t, kn)).reshape(b * h_, g * t, kn)
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("xqk,xkd->xqd", weights, vt)
  out = out.reshape(b, h_, g, t, d_).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d_)
  return out.astype(q.dtype)
