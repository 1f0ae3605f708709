"""``Pages``: one of K or V as stored (codes, scales, zeros, staging ring, sink), and
one-layer views of it.

The bottom of the package: the quantization codecs, the kernels and the cache
all read a layout from a ``Pages``. Names in shapes: L = num_layers, P =
num_pages, S = page_size, H = num_kv_heads, D = head_dim, B = max_seqs.

>>> import jax.numpy as jnp
>>> p = Pages(data=jnp.zeros((2, 4, 1, 8)))
>>> head_dim_of(p), p.spec.is_quantized
(8, False)
"""

from __future__ import annotations

from typing import Optional
from kvjax.layout.spec import QuantSpec
import jax
from flax import struct
@struct.dataclass
class Pages:
  """One of K or V for all layers of one tier, with how it is stored.

  ``spec`` and ``residual`` are static (part of the tree structure, not
  arrays): ``write`` and ``attend`` read the layout from the pages they are
  given. A cache whose specs need staging (a channel-axis spec or a residual
  window, ``needs_staging``) also holds each sequence's newest pages in
  full precision in ``stage``, a ring of ``NS = staging_pages(...)``
  pages per sequence slot; page ``j`` of a sequence lives in ring slot
  ``j % NS`` until it is folded (quantized) into its pool page. A spec with a
  ``sink`` also keeps each sequence's first N tokens in ``sink`` (attention
  reads them from there; the pool page holds them quantized too, for
  sharing). Shapes below are for all layers; the layer scan sees them
  without the leading L.
  """

  data: jax.Array                    # [L, P, S, H, D] config dtype; uint8 [L, P, S, H, D/n]
  #                                    packed codes (n per byte) or float8_e4m3fn when quantized
  scale: Optional[jax.Array] = None  # [L, P, S, H, D/g] ("token") or [L, P, S/g, H, D]
  #                                    ("channel"), bf16/f16 or uint8 log8; None when unquantized
  zero: Optional[jax.Array] = None   # int8, scale's shape; asymmetric specs only, else None
  stage: Optional[jax.Array] = None  # [L, B, NS, S, H, D] config dtype: full-precision ring of
  #                                    each sequence slot's unfolded pages; None without staging
  sink: Optional[jax.Array] = None   # [L, B, N, H, D] config dtype: each sequence slot's first
  #                                    N tokens in full precision (``sink_tokens``); None if N=0
  spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec())  # static: the layout
  residual: int = struct.field(pytree_node=False, default=0)  # static: the cache's window
  #                                    (tokens, max of the K and V specs'), same on K and V
  rope_base: float = struct.field(pytree_node=False, default=0.0)  # static: > 0 on keys stored
  #                                    before RoPE (``CacheConfig.key_rope``); attend rotates them


def head_dim_of(pages: Pages) -> int:
  """D of one layer's pages (the data's last axis is D / codes per byte when packed)."""
  spec = pages.spec
  if spec.is_quantized and spec.kind == "int":
    return pages.data.shape[-1] * spec.codes_per_byte
  return pages.data.shape[-1]


def pool_only(pages: Pages) -> Pages:
  """The pages without their staging ring and sink rows (what the quant/kernel functions take)."""
  if pages.stage is None and pages.sink is None:
    return pages
  return pages.replace(stage=None, sink=None)


def check_layer(name: str, pages: Pages) -> None:
  if not isinstance(pages, Pages):
    raise ValueError(f"{name} must be a kvjax.Pages of one layer, got {type(pages).__name__}")
  if pages.data.ndim != 4:
    raise ValueError(f"{name}.data must be one layer's pages [P, S, H, D], got shape "
                     f"{tuple(pages.data.shape)}")
  if pages.stage is not None and pages.stage.ndim != 5:
    raise ValueError(f"{name}.stage must be one layer's ring [B, NS, S, H, D], got shape "
                     f"{tuple(pages.stage.shape)}")
  if pages.sink is not None and pages.sink.ndim != 4:
    raise ValueError(f"{name}.sink must be one layer's sink rows [B, N, H, D], got shape "
                     f"{tuple(pages.sink.shape)}")
