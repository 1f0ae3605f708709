"""Paged decode attention over quantized pages: jnp reference and Pallas kernel.

Names used in shapes: B = batch (sequences), Hq = query heads, H = KV heads,
G = Hq // H (GQA group), D = head_dim, P = pages in the pool, S = page_size,
M = page-table columns, NS = staging pages per sequence, W = D // codes per byte.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax import quant
from kvjax.quant import QuantSpec
from kvjax.state import Pages


def _check_args(q, k_pages, v_pages, page_table, kv_lens, k_spec, v_spec, k_stage, v_stage,
                what):
  """Host-side shape checks shared by the reference and the kernel wrapper."""
  if q.ndim != 3:
    raise ValueError(f"{what}: q must be [B, Hq, D], got shape {q.shape}")
  b, hq, d = q.shape
  for name, pages, spec in (("k_pages", k_pages, k_spec), ("v_pages", v_pages, v_spec)):
    if pages.data.ndim != 4:
      raise ValueError(f"{what}: {name}.data must be [P, S, H, *], got shape "
                       f"{pages.data.shape}")
    spec.validate_for(head_dim=d, page_size=pages.data.shape[1], what=f"{what}: {name}")
    width = d // spec.codes_per_byte if spec.kind == "int" and spec.is_quantized else d
    if pages.data.shape[-1] != width:
      raise ValueError(f"{what}: {name}.data last axis must be {width} for head_dim={d} "
                       f"and {spec}, got {pages.data.shape[-1]}")
  h = k_pages.data.shape[2]
  if hq % h:
    raise ValueError(f"{what}: query heads {hq} not a multiple of kv heads {h}")
  if page_table.ndim != 2 or page_table.shape[0] != b:
    raise ValueError(f"{what}: page_table must be [B={b}, M], got shape {page_table.shape}")
  if kv_lens.shape != (b,):
    raise ValueError(f"{what}: kv_lens must be [B={b}], got shape {kv_lens.shape}")
  if (k_stage is None) != (v_stage is None):
    raise ValueError(f"{what}: give both k_stage and v_stage or neither")
  if k_stage is not None:
    s = k_pages.data.shape[1]
    for name, st in (("k_stage", k_stage), ("v_stage", v_stage)):
      if st.ndim != 5 or st.shape[0] != b or st.shape[2:] != (s, h, d):
        raise ValueError(f"{what}: {name} must be [B={b}, NS, S={s}, H={h}, D={d}], "
                         f"got shape {st.shape}")
    ns = quant.staging_pages(k_spec, v_spec, s)
    if k_stage.shape[1] != ns:
      raise ValueError(f"{what}: staging ring must hold {ns} pages for these specs, "
                       f"got {k_stage.shape[1]}")


def _gather_dense(pages: Pages, spec: QuantSpec, page_table, kv_lens, stage, residual):
  """float32 [B, M * S, H, D]: each sequence's pages, staged ones from the ring."""
  pt = jnp.clip(page_table, 0, pages.data.shape[0] - 1)
  x = quant.dequantize_pages(jax.tree.map(lambda a: a[pt], pages), spec)  # [B, M, S, H, D]
  if stage is not None:
    s, m, ns = x.shape[2], x.shape[1], stage.shape[1]
    j = jnp.arange(m)
    staged = j[None, :] >= quant.first_staged_page(kv_lens, residual, s)[:, None]
    x = jnp.where(staged[:, :, None, None, None], stage[:, j % ns].astype(jnp.float32), x)
  b, m, s, h, d = x.shape
  return x.reshape(b, m * s, h, d)


def paged_attention_reference(q: jax.Array, k_pages: Pages, v_pages: Pages,
                              page_table: jax.Array, kv_lens: jax.Array, k_spec: QuantSpec,
                              v_spec: QuantSpec, *, k_stage: Optional[jax.Array] = None,
                              v_stage: Optional[jax.Array] = None) -> jax.Array:
  """Decode attention (one query token per sequence) over paged, quantized K/V.

  Args:
    q: float ``[B, Hq, D]``; query head ``i`` reads kv head ``i // G``.
    k_pages / v_pages: one layer's ``Pages`` with arrays ``[P, S, H, *]`` in
      ``k_spec`` / ``v_spec`` layout.
    page_table: int32 ``[B, M]``; entries past a sequence's pages are ignored.
    kv_lens: int32 ``[B]`` tokens to attend to (0 gives a zero output).
    k_spec / v_spec: the pools' ``QuantSpec``s.
    k_stage / v_stage: optional float ``[B, NS, S, H, D]`` full-precision
      staging rings: pages ``j >= first_staged_page(kv_len, residual, S)`` are
      read from ``stage[b, j % NS]`` instead of the pool.

  Returns:
    float32 ``[B, Hq, D]``, softmax scale ``1 / sqrt(D)``.

  >>> spec = QuantSpec()
  >>> k = Pages(data=jnp.ones((1, 2, 1, 4))); v = Pages(data=jnp.ones((1, 2, 1, 4)))
  >>> out = paged_attention_reference(jnp.ones((1, 2, 4)), k, v, jnp.zeros((1, 1), jnp.int32),
  ...                                 jnp.array([2]), spec, spec)
  >>> out.shape, float(out[0, 0, 0])
  ((1, 2, 4), 1.0)
  """
  _check_args(q, k_pages, v_pages, page_table, kv_lens, k_spec, v_spec, k_stage, v_stage,
              "paged_attention_reference")
  b, hq, d = q.shape
  h = k_pages.data.shape[2]
  residual = quant.residual_tokens(k_spec, v_spec)
  k = _gather_dense(k_pages, k_spec, page_table, kv_lens, k_stage, residual)
  v = _gather_dense(v_pages, v_spec, page_table, kv_lens, v_stage, residual)
  qg = q.astype(jnp.float32).reshape(b, h, hq // h, d)
  scores = jnp.einsum("bhgd,bthd->bhgt", qg, k) / jnp.sqrt(jnp.float32(d))
  valid = jnp.arange(k.shape[1])[None, :] < kv_lens[:, None]          # [B, T]
  scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhgt,bthd->bhgd", p, v) / jnp.where(l > 0, l, 1.0)
  return out.reshape(b, hq, d)
