"""The staging ring: a sequence's newest pages in full precision, folded (quantized)
into their pool pages once the residual window has passed them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.layout.pages import Pages
from kvjax.layout.shapes import first_staged_page
from kvjax.layout.spec import QuantSpec
from kvjax.quant.pages import fold_page
from kvjax.quant.pages import store_pages

def stage_and_fold(pool: Pages, stage: jax.Array, page_table: jax.Array, kv_lens: jax.Array,
                   x: jax.Array, num_new: jax.Array, spec: QuantSpec, *,
                   residual: int, floor: Optional[jax.Array] = None) -> tuple[Pages, jax.Array]:
  """Write new tokens through the full-precision ring; fold pages that become due.

  Page ``j`` of a sequence is due when ``(j + 1) * S + residual <= kv_len``
  (``first_staged_page``). This step's due pages are assembled from the ring
  (tokens already cached) and ``x`` (new tokens), quantized whole
  (``fold_page``) and stored at their page ids; new tokens of pages that stay
  staged go to ring slot ``j % NS``. A prefill chunk longer than the ring is
  fine: its full pages are folded straight from ``x``.

  Args:
    pool: one layer's ``Pages`` in ``spec``, arrays ``[P, S, H, *]``.
    stage: float ``[B, NS, S, H, D]`` ring, NS = ``staging_pages(...)``.
    page_table: int32 ``[B, M]`` after this step's allocation.
    kv_lens: int32 ``[B]`` tokens cached *before* this step.
    x: float ``[B, T, H, D]`` new tokens; row ``b`` uses its first ``num_new[b]``.
    num_new: int32 ``[B]`` new tokens per sequence (0 for idle rows).
    spec: the pool's spec.
    residual: the cache's window, ``residual_tokens(key_spec, value_spec)``.
    floor: optional int32 ``[B]``: each sequence's leading pages that are
      already folded whatever the rule says (a prefix attached from the cache);
      they are never folded again (they may be shared).

  Returns:
    ``(pool, stage)`` updated.

  >>> from kvjax.quant.pages import init_quant_pages
  >>> from kvjax.quant.pages import dequantize_pages
  >>> spec = QuantSpec(bits=8, axis="channel")
  >>> pool = init_quant_pages(spec, num_pages=2, page_size=2, num_kv_heads=1, head_dim=4)
  >>> stage = jnp.zeros((1, 1, 2, 1, 4))
  >>> pool, stage = stage_and_fold(pool, stage, jnp.array([[1, 0]]), jnp.array([0]),
  ...                              jnp.full((1, 3, 1, 4), 127.0), jnp.array([3]), spec,
  ...                              residual=0)
  >>> float(dequantize_pages(pool, spec)[1, 0, 0, 0]), float(stage[0, 0, 0, 0, 0])
  (127.0, 127.0)
  """
  b, ns, s, h, d = stage.shape
  t = x.shape[1]
  n0 = kv_lens.astype(jnp.int32)
  n1 = n0 + num_new.astype(jnp.int32)
  f0 = first_staged_page(n0, residual, s)
  f1 = first_staged_page(n1, residual, s)
  if floor is not None:
    f0, f1 = jnp.maximum(f0, floor), jnp.maximum(f1, floor)
  count = f1 - f0                                                    # [B]
  folds = t // s + 1                                                 # static bound on count
  j = f0[:, None] + jnp.arange(folds)[None, :]                       # [B, F]
  pos = j[..., None] * s + jnp.arange(s)                             # [B, F, S]
  rows = jnp.arange(b)[:, None, None]
  from_ring = stage[rows, (j % ns)[..., None], pos % s]              # [B, F, S, H, D]
  from_x = x[rows, jnp.clip(pos - n0[:, None, None], 0, t - 1)]
  page_vals = jnp.where((pos < n0[:, None, None])[..., None, None], from_ring, from_x)
  folded = fold_page(page_vals.reshape(b * folds, s, h, d), spec)
  m = page_table.shape[1]
  ids = page_table[jnp.arange(b)[:, None], jnp.clip(j, 0, m - 1)]
  ids = jnp.where((jnp.arange(folds)[None, :] < count[:, None]) & (j < m), ids, -1)
  pool = store_pages(pool, ids.reshape(-1), folded)
  # new tokens of pages that stay staged go to the ring
  tpos = n0[:, None] + jnp.arange(t)[None, :]                        # [B, T]
  keep = (jnp.arange(t)[None, :] < num_new[:, None]) & (tpos // s >= f1[:, None])
  slot_b = jnp.where(keep, jnp.arange(b)[:, None], b)                # b: dropped
  stage = stage.at[slot_b, (tpos // s) % ns, tpos % s].set(x.astype(stage.dtype), mode="drop")
  return pool, stage


