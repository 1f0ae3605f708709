"""Invariants of the two-tier cache, checked on the host.

>>> import kvjax
>>> from kvjax.tiers.config import TierConfig
>>> from kvjax.tiers.state import init
>>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
>>> tier_violations(init(cfg, TierConfig(l2_pages=4)), config=cfg)
[]
"""

from __future__ import annotations

import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.cache.invariants import invariant_violations
from kvjax.tiers.state import TieredState


def tier_violations(ts: TieredState, *, config: CacheConfig) -> list:
  """Violated invariants (strings): L1's own, plus L2 and counter consistency.

  L2: no two L1 pages share an L2 copy; the copy of an indexed full L1 page records its L1 page's block; an
  L2 parent is a full L2 page at the previous position; counters add up
  (L1 + L2 + L3 hits <= lookups, tokens = pages * page_size, L3 hits <= L3
  promotions).
  """
  out = list(invariant_violations(ts.l1, config))
  s = config.page_size
  copy = np.asarray(ts.l1_copy)
  m2 = {n: np.asarray(getattr(ts.l2.meta, n)) for n in ("filled", "parent", "position",
                                                        "tokens", "block_hash")}
  m1_tokens = np.asarray(ts.l1.meta.tokens)
  used = copy[copy >= 0]
  if len(set(used.tolist())) != used.size:
    out.append("two L1 pages share one L2 copy")
  full = (np.any(np.asarray(ts.l1.meta.block_hash) != 0, axis=-1)
          & (np.asarray(ts.l1.meta.filled) == s))
  for p in np.flatnonzero((copy >= 0) & full):  # others are stale until the next sync
    q = copy[p]
    if m2["filled"][q] != s or not np.array_equal(m2["tokens"][q], m1_tokens[p]):
      out.append(f"L1 page {p}: its L2 copy {q} holds another block")
  for q in np.flatnonzero(m2["filled"] == s):
    par = m2["parent"][q]
    if par >= 0 and (m2["filled"][par] != s or m2["position"][par] != m2["position"][q] - 1):
      out.append(f"L2 page {q}: parent {par} is not its predecessor")
  st = ts.stats
  hits = int(st.l1_hit_pages) + int(st.l2_hit_pages) + int(st.l3_hit_pages)
  if hits > int(st.lookups_pages):
    out.append(f"hits {hits} > lookups {int(st.lookups_pages)}")
  if (int(st.l1_hit_tokens) != s * int(st.l1_hit_pages)
      or int(st.l2_hit_tokens) != s * int(st.l2_hit_pages)
      or int(st.l3_hit_tokens) != s * int(st.l3_hit_pages)):
    out.append("hit tokens != hit pages * page_size")
  if int(st.l3_hit_pages) > int(st.l3_promotions):
    out.append(f"L3 hits {int(st.l3_hit_pages)} > L3 promotions {int(st.l3_promotions)}")
  return out


def check_tiers(ts: TieredState, *, config: CacheConfig) -> None:
  """Raise ``AssertionError`` listing ``tier_violations`` if any."""
  bad = tier_violations(ts, config=config)
  if bad:
    raise AssertionError("; ".join(bad))
