"""Storage shapes, byte accounting and staging-ring geometry of a spec (no arrays computed).

Names in shapes: P = num_pages, S = page_size, H = num_kv_heads, D = head_dim,
n = codes per byte, W = D // n.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.layout.pages import Pages
from kvjax.layout.spec import QuantSpec

# ----------------------------------------------------------------------------- storage


def page_shapes(spec: QuantSpec, *, num_pages: int, page_size: int, num_kv_heads: int,
                head_dim: int, dtype="bfloat16", num_layers: Optional[int] = None) -> Pages:
  """``Pages`` of ``jax.ShapeDtypeStruct`` describing a pool stored in ``spec``.

  Shapes are ``[L, P, ...]`` with ``num_layers`` given, ``[P, ...]`` without.

  >>> page_shapes(QuantSpec(bits=4), num_pages=8, page_size=16, num_kv_heads=3,
  ...             head_dim=64).data.shape
  (8, 16, 3, 32)
  """
  lead = (num_pages,) if num_layers is None else (num_layers, num_pages)
  sds = jax.ShapeDtypeStruct
  if not spec.is_quantized:
    return Pages(data=sds(lead + (page_size, num_kv_heads, head_dim), jnp.dtype(dtype)))
  spec.validate_for(head_dim=head_dim, page_size=page_size, what="page_shapes")
  g = spec.group(head_dim=head_dim, page_size=page_size)
  if spec.kind == "fp8":
    data = sds(lead + (page_size, num_kv_heads, head_dim), jnp.float8_e4m3fn)
  else:
    data = sds(lead + (page_size, num_kv_heads, head_dim // spec.codes_per_byte), jnp.uint8)
  if spec.axis == "token":
    sshape = lead + (page_size, num_kv_heads, head_dim // g)
  else:
    sshape = lead + (page_size // g, num_kv_heads, head_dim)
  sdt = jnp.uint8 if spec.scale_dtype == "log8" else jnp.dtype(spec.scale_dtype)
  zero = sds(sshape, zero_storage_dtype(spec)) if spec.has_zero else None
  return Pages(data=data, scale=sds(sshape, sdt), zero=zero)



# ----------------------------------------------------------------------------- accounting


def bytes_per_token(spec: QuantSpec, num_layers: int, num_kv_heads: int, head_dim: int,
                    page_size: int, dtype="bfloat16") -> float:
  """Bytes one cached token costs in K *or* V across all layers, scales included.

  ``dtype`` is the unquantized storage (bits=16). The full-precision staging
  (partial page, residual window) is a per-sequence cost, not counted here:
  see ``staging_bytes_per_seq``.

  >>> bytes_per_token(QuantSpec(), 30, 3, 64, 16)
  11520.0
  >>> bytes_per_token(QuantSpec(bits=8), 30, 3, 64, 16)
  5940.0
  """
  if not spec.is_quantized:
    return float(num_layers * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize)
  spec.validate_for(head_dim=head_dim, page_size=page_size, what="bytes_per_token")
  g = spec.group(head_dim=head_dim, page_size=page_size)
  meta = spec.scale_bytes + spec.zero_bytes
  per_head = head_dim * spec.bits / 8
  if spec.axis == "token":
    per_head += (head_dim // g) * meta
  else:
    per_head += head_dim * meta / g
  return float(num_layers * num_kv_heads * per_head)


def compression(key_spec: QuantSpec, value_spec: QuantSpec, *, num_layers: int,
                num_kv_heads: int, head_dim: int, page_size: int) -> float:
  """bf16 bytes per token (K+V) over this pair's bytes per token.

  >>> round(compression(QuantSpec(bits=8), QuantSpec(bits=8), num_layers=30,
  ...                   num_kv_heads=3, head_dim=64, page_size=16), 3)
  1.939
  """
  dims = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
              page_size=page_size)
  bf16 = 2 * bytes_per_token(QuantSpec(), **dims)
  return bf16 / (bytes_per_token(key_spec, **dims) + bytes_per_token(value_spec, **dims))


# ----------------------------------------------------------------------------- staging


def needs_staging(key_spec: QuantSpec, value_spec: QuantSpec) -> bool:
  """Whether recent tokens must be kept in full precision before folding."""
  return any(s.is_quantized and (s.axis == "channel" or s.residual)
             for s in (key_spec, value_spec))


def residual_tokens(key_spec: QuantSpec, value_spec: QuantSpec) -> int:
  """The cache's full-precision window: the larger of the two specs' residuals."""
  return max(key_spec.residual, value_spec.residual)


def sink_tokens(key_spec: QuantSpec, value_spec: QuantSpec) -> int:
  """Leading tokens of each sequence kept in full precision: the larger of the specs' sinks.

  >>> sink_tokens(QuantSpec(bits=2, sink=1), QuantSpec(bits=2))
  1
  """
  return max(key_spec.sink, value_spec.sink)


def staging_pages(key_spec: QuantSpec, value_spec: QuantSpec, page_size: int) -> int:
  """Pages of the per-sequence full-precision ring: ``residual // S + 1`` (0 if none).

  >>> staging_pages(QuantSpec(bits=4, axis="channel", residual=32), QuantSpec(bits=4), 16)
  3
  """
  if not needs_staging(key_spec, value_spec):
    return 0
  return residual_tokens(key_spec, value_spec) // page_size + 1


def first_staged_page(kv_lens: jax.Array, residual: int, page_size: int) -> jax.Array:
  """Index of the first page of each sequence still held in the staging ring.

  Page ``j`` is quantized (folded) iff ``(j + 1) * S + residual <= kv_len``;
  pages ``first_staged_page .. ceil(kv_len / S) - 1`` live in staging slot
  ``j % staging_pages``.

  >>> first_staged_page(jnp.array([0, 15, 16, 47]), 16, 16).tolist()
  [0, 0, 0, 1]
  """
  return jnp.maximum(kv_lens - residual, 0) // page_size


def pages_to_fold(old_lens: jax.Array, new_lens: jax.Array, residual: int,
                  page_size: int) -> tuple[jax.Array, jax.Array]:
  """Pages whose fold falls in a step that grows lengths from old to new.

  Returns ``(first, count)``: int32 ``[B]`` each; pages ``first .. first+count-1``
  of each sequence are to be quantized from staging into the pool this step.

  >>> [a.tolist() for a in pages_to_fold(jnp.array([15]), jnp.array([17]), 0, 16)]
  [[0], [1]]
  """
  first = first_staged_page(old_lens, residual, page_size)
  return first, first_staged_page(new_lens, residual, page_size) - first


def staging_bytes_per_seq(key_spec: QuantSpec, value_spec: QuantSpec, *, num_layers: int,
                          num_kv_heads: int, head_dim: int, page_size: int,
                          dtype="bfloat16") -> int:
  """Bytes of one sequence's full-precision rows: its staging ring and its sink
  tokens (K and V, all layers)."""
  n = staging_pages(key_spec, value_spec, page_size) * page_size + sink_tokens(key_spec,
                                                                                value_spec)
  return int(2 * n * num_layers * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize)


def zero_storage_dtype(spec: QuantSpec):
  """The dtype of a spec's stored zero points (int8, bfloat16 or float16).

  >>> zero_storage_dtype(QuantSpec(bits=2, symmetric=False, zero_dtype="float16"))
  dtype('float16')
  """
  return jnp.dtype(spec.zero_dtype)
