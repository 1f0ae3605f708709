"""ARC (Megiddo & Modha, FAST 2003) as an exact O(1)-per-reference host simulator.

ARC keeps two LRU lists of cached blocks, T1 (seen once recently) and T2 (seen at least
twice), and two ghost lists of recently evicted keys, B1 (evicted from T1) and B2 (from
T2), with ``|T1| + |T2| <= c`` and ``|T1| + |B1| <= c``, ``|T1| + |T2| + |B1| + |B2| <=
2c``. A hit in B1 grows the target size ``p`` of T1 by ``max(|B2| / |B1|, 1)``, a hit in
B2 shrinks it by ``max(|B1| / |B2|, 1)``; ``REPLACE`` evicts from T1 when it is above
its target (or at it, for a B2 hit), else from T2.

Why a host structure and not a scoring policy: ARC's victim is the LRU end of one of two
lists chosen by the adaptive ``p``, and its ghosts are lists of keys with their own LRU
order; expressed as page scores it needs two class offsets and a ghost LRU of 2c keys
that a per-page score cannot hold. So ``arc`` is simulator-only (``simulate_hits(...,
policy="arc")``), like a reference implementation: four ``OrderedDict``s, a constant
number of dict operations per reference (about a microsecond in CPython).
"""

from __future__ import annotations

import collections

import numpy as np

HOST_POLICIES = ("arc",)


def arc_hits(blocks, capacity: int) -> np.ndarray:
  """bool numpy [N]: ARC's hit flags on int [N] block ids with ``capacity`` blocks.

  >>> arc_hits([1, 2, 1, 3, 4, 1], 2).astype(int).tolist()
  [0, 0, 1, 0, 0, 1]
  """
  if isinstance(capacity, bool) or int(capacity) <= 0:
    raise ValueError(f"capacity must be a positive int, got {capacity!r}")
  c = int(capacity)
  t1, t2 = collections.OrderedDict(), collections.OrderedDict()  # LRU first
  b1, b2 = collections.OrderedDict(), collections.OrderedDict()
  p = 0.0
  refs = np.asarray(blocks).tolist()
  hits = np.zeros(len(refs), bool)

  def replace(in_b2: bool) -> None:
    if t1 and ((in_b2 and len(t1) == p) or len(t1) > p):
      b1[t1.popitem(last=False)[0]] = None
    else:
      b2[t2.popitem(last=False)[0]] = None

  for i, x in enumerate(refs):
    if x in t1:
      del t1[x]
      t2[x] = None
      hits[i] = True
    elif x in t2:
      t2.move_to_end(x)
      hits[i] = True
    elif x in b1:
      p = min(float(c), p + max(len(b2) / len(b1), 1.0))
      replace(False)
      del b1[x]
      t2[x] = None
    elif x in b2:
      p = max(0.0, p - max(len(b1) / len(b2), 1.0))
      replace(True)
      del b2[x]
      t2[x] = None
    else:
      l1 = len(t1) + len(b1)
      if l1 == c:
        if len(t1) < c:
          b1.popitem(last=False)
          replace(False)
        else:
          t1.popitem(last=False)
      elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
        if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
          b2.popitem(last=False)
        replace(False)
      t1[x] = None
  return hits
