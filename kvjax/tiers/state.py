"""Two-tier state: L1 (``CacheState``), L2 (``L2State``: pages and metadata) and counters.

Names in shapes: L = num_layers, P1 = L1 pages, P2 = ``TierConfig.l2_pages``, S = page_size.

>>> import kvjax
>>> from kvjax.tiers.config import TierConfig
>>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
...                         num_pages=4, max_seqs=2, max_pages_per_seq=2)
>>> init(cfg, TierConfig(l2_pages=3)).l2.meta.filled.shape
(3,)
"""

from __future__ import annotations

from typing import Any

from flax import struct
import jax
import jax.numpy as jnp

from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.cache.state import init as init_l1
from kvjax.layout.meta import init_meta
from kvjax.layout.meta import PageMeta
from kvjax.layout.pages import Pages
from kvjax.layout.shapes import needs_staging
from kvjax.quant.pages import init_quant_pages
from kvjax.tiers.config import TierConfig


@struct.dataclass
class L2State:
  """L2's pool: pages in L2's specs and the same per-page metadata as L1.

  ``meta.parent`` names the L2 page holding the block's predecessor (-1 at a
  sequence start, -2 orphaned: its predecessor left L2). A page is free when
  ``meta.filled == 0``.
  """

  k: Pages          # arrays [L, P2, S, H, *] in TierConfig.l2_key_quant
  v: Pages          # arrays [L, P2, S, H, *] in TierConfig.l2_value_quant
  meta: PageMeta    # [P2]-leading metadata (block_hash, tokens, parent, namespace, ...)


@struct.dataclass
class TierStats:
  """Counters per tier (monotone); ratios are derived on the host (``hit_ratios``)."""

  lookups_pages: jax.Array    # int32 []  full prompt pages looked up by tiered attach_prefix
  lookups_tokens: jax.Array   # int32 []  their tokens
  l1_hit_pages: jax.Array     # int32 []  of those, served from L1 as found
  l2_hit_pages: jax.Array     # int32 []  served from L2 (promoted into L1)
  l1_hit_tokens: jax.Array    # int32 []  tokens of l1_hit_pages
  l2_hit_tokens: jax.Array    # int32 []  tokens of l2_hit_pages
  demotions: jax.Array        # int32 []  pages copied L1 -> L2
  promotions: jax.Array       # int32 []  pages copied L2 -> L1
  l2_evictions: jax.Array     # int32 []  L2 pages dropped for new demotions
  bytes_demoted: jax.Array    # int32 []  bytes written into L2 (K + V, all layers)
  bytes_promoted: jax.Array   # int32 []  bytes written into L1 from L2
  verify_failures: jax.Array  # int32 []  L2 candidates (same hash) rejected by verification
  swaps_out: jax.Array        # int32 []  live sequences swapped out to L2
  swaps_in: jax.Array         # int32 []  swapped sequences resumed
  l3_lookups_pages: jax.Array  # int32 []  prompt pages looked up in L3 (after L1 and L2)
  l3_hit_pages: jax.Array     # int32 []  served from L3 (promoted into L2 and L1)
  l3_hit_tokens: jax.Array    # int32 []  tokens of l3_hit_pages
  l3_demotions: jax.Array     # int32 []  pages written to L3 (write policy's events)
  l3_promotions: jax.Array    # int32 []  pages read from L3 and verified into L2
  l3_bytes_demoted: jax.Array  # int32 []  bytes written to L3 (its page format)
  l3_bytes_promoted: jax.Array  # int32 []  bytes read from L3 and promoted
  l3_checksum_failures: jax.Array  # int32 []  L3 reads that failed a checksum or lost a file
  l3_verify_failures: jax.Array  # int32 []  L3 pages read intact but failing the structure check
  l3_write_errors: jax.Array  # int32 []  L3 writes that failed (disk full: writing turns off)


@struct.dataclass
class TieredState:
  """The tiered cache. ``l1_copy[p]`` is the L2 page holding a copy of L1 page p.

  ``l3`` is the host-side L3 tier under L2 (``kvjax.tiers.l3.L3Tier``, static: not a
  pytree leaf) or None; ``kvjax.tiers.l3.with_l3`` sets it.
  """

  l1: CacheState
  l2: L2State
  l1_copy: jax.Array  # int32 [P1]  L2 copy of each L1 page (-1 = none)
  stats: TierStats
  l3: Any = struct.field(pytree_node=False, default=None)  # L3Tier (host object) or None


def zero_stats() -> TierStats:
  """All-zero ``TierStats``."""
  names = TierStats.__dataclass_fields__
  return TierStats(**{n: jnp.zeros((), jnp.int32) for n in names})


def l2_pages(config: CacheConfig, spec, n: int) -> Pages:
  """Empty L2 pages of one of K/V: arrays ``[L, n, S, H, *]`` in ``spec``."""
  if not spec.is_quantized:
    shape = (config.num_layers, n, config.page_size, config.num_kv_heads, config.head_dim)
    return Pages(data=jnp.zeros(shape, config.jnp_dtype), spec=spec)
  p = init_quant_pages(spec, num_pages=n, page_size=config.page_size,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       dtype=config.dtype, num_layers=config.num_layers)
  return p.replace(spec=spec)


def check_l1(config: CacheConfig) -> None:
  """Raise ``ValueError`` for L1 configs the tiers do not handle yet."""
  if (config.key_quant.is_quantized or config.value_quant.is_quantized
      or needs_staging(config.key_quant, config.value_quant)):
    raise ValueError("kvjax.tiers: L1 must be unquantized (key_quant/value_quant bits=16) for "
                     f"now, got {config.key_quant} / {config.value_quant}")
  if not config.prefix_caching:
    raise ValueError("kvjax.tiers: CacheConfig.prefix_caching must be True")


def init(config: CacheConfig, tiers: TierConfig) -> TieredState:
  """An empty two-tier cache (L1 per ``config``, L2 per ``tiers``)."""
  check_l1(config)
  if not isinstance(tiers, TierConfig):
    raise ValueError(f"init: tiers must be a TierConfig, got {type(tiers).__name__}")
  n = tiers.l2_pages
  l2 = L2State(k=l2_pages(config, tiers.l2_key_quant, n),
               v=l2_pages(config, tiers.l2_value_quant, n),
               meta=init_meta(n, config.page_size))
  return TieredState(l1=init_l1(config), l2=l2,
                     l1_copy=jnp.full((config.num_pages,), -1, jnp.int32), stats=zero_stats())


def hit_ratios(stats: TierStats) -> dict:
  """Host-side page hit ratios: ``l1``, ``l2``, ``l3`` and ``total`` (= l1 + l2 + l3 exactly)."""
  q = max(int(stats.lookups_pages), 1)
  l1, l2, l3 = int(stats.l1_hit_pages), int(stats.l2_hit_pages), int(stats.l3_hit_pages)
  return {"l1": l1 / q, "l2": l2 / q, "l3": l3 / q, "total": (l1 + l2 + l3) / q}
