"""ARC (Megiddo & Modha, FAST 2003): a jitted O(1)-per-reference simulator and a host one.

ARC keeps two LRU lists of cached blocks, T1 (seen once recently) and T2 (seen at least
twice), and two ghost lists of recently evicted keys, B1 (evicted from T1) and B2 (from
T2), with ``|T1| + |T2| <= c`` and ``|T1| + |B1| <= c``, ``|T1| + |T2| + |B1| + |B2| <=
2c``. A hit in B1 grows the target size ``p`` of T1 by ``max(|B2| / |B1|, 1)``, a hit in
B2 shrinks it by ``max(|B1| / |B2|, 1)``; ``REPLACE`` evicts from T1 when it is above
its target (or at it, for a B2 hit), else from T2.

``arc-bypass`` is ARC that never caches a request's partial last block (``filled <
block_size``; such a block is almost never referenced again): a partial block that is
not in T1/T2 is a miss that changes nothing, not even the ghost lists.

Why not a scoring policy: ARC's victim is the LRU end of one of two lists chosen by the
adaptive ``p``, and its ghosts are lists of keys with their own LRU order; expressed as
page scores it needs a ghost LRU of 2c keys that a per-page score cannot hold. So
``arc`` / ``arc-bypass`` are simulator policies (``simulate_hits(..., policy="arc")``).

Two implementations, equal hit for hit (tested): ``arc_hits`` on the host (four
``OrderedDict``s; the reference), and ``arc_scan_hits``, a ``lax.scan`` over the
references in which the four lists are doubly linked lists held in arrays (``next`` /
``prev`` int32 [2P + 4]: nodes ``0..2P-1`` hold tracked keys, ``2P + l`` is list ``l``'s
sentinel, whose ``next`` is its most recent node and ``prev`` its least recent), so a
reference costs a constant number of gathers and scatters; capacities and the bypass
flag are ``vmap``ped (one compilation per shape). As in ``kvjax.sim.exact``, the writes
to the large block-to-node table are carried as scalars and applied at the start of the
next step, so XLA updates it in place.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

HOST_POLICIES = ("arc", "arc-bypass")
T1, T2, B1, B2 = 0, 1, 2, 3


def arc_hits(blocks, capacity: int, partial=None) -> np.ndarray:
  """bool numpy [N]: ARC's hit flags on int [N] block ids with ``capacity`` blocks.

  Args:
    blocks: int [N] block ids.
    capacity: blocks the cache holds (> 0).
    partial: optional bool [N]; where True a block missing from T1/T2 is not cached
      (``arc-bypass``).

  >>> arc_hits([1, 2, 1, 3, 4, 1], 2).astype(int).tolist()
  [0, 0, 1, 0, 0, 1]
  """
  if isinstance(capacity, bool) or int(capacity) <= 0:
    raise ValueError(f"capacity must be a positive int, got {capacity!r}")
  c = int(capacity)
  t1, t2 = collections.OrderedDict(), collections.OrderedDict()  # LRU first
  b1, b2 = collections.OrderedDict(), collections.OrderedDict()
  p = np.float32(0.0)  # float32, as in the jitted scan (so the two agree hit for hit)
  one, cf = np.float32(1.0), np.float32(c)
  refs = np.asarray(blocks).tolist()
  skip = [False] * len(refs) if partial is None else np.asarray(partial, bool).tolist()
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
    elif skip[i]:
      continue
    elif x in b1:
      p = min(cf, p + max(np.float32(len(b2)) / np.float32(len(b1)), one))
      replace(False)
      del b1[x]
      t2[x] = None
    elif x in b2:
      p = max(np.float32(0.0), p - max(np.float32(len(b1)) / np.float32(len(b2)), one))
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


class _Overlay:
  """A carried int32 array whose writes in a step are held back (trace-time helper).

  ``get`` reads the array as of the step start and overrides the value with any earlier
  write of the same step; ``writes()`` returns the writes, which the next step applies
  (``apply``) before it reads anything. So every step writes its arrays before it reads
  them and XLA updates them in place (a read used after a write forces a copy).
  """

  def __init__(self, base, drop: int):
    self.base, self.drop, self.log = base, drop, []

  def get(self, i):
    v = self.base[i]
    for j, w in self.log:
      v = jnp.where(j == i, w, v)
    return v

  def put(self, i, v, cond):
    self.log.append((jnp.where(cond, i, self.drop), v))

  def writes(self, count: int):
    log = self.log + [(jnp.int32(self.drop), jnp.int32(0))] * (count - len(self.log))
    return (jnp.stack([j for j, _ in log]).astype(jnp.int32),
            jnp.stack([jnp.asarray(w, jnp.int32) for _, w in log]))


def _apply(arr, writes):
  idx, val = writes
  for k in range(idx.shape[0]):  # in order: a later write to the same index wins
    arr = arr.at[idx[k]].set(val[k], mode="drop")
  return arr


def _arc_scan(blocks, partial, capacity, bypass, *, num_pages: int, num_blocks: int):
  """bool [N] hit flags of one ARC run (capacity int32 [] <= num_pages, bypass bool [])."""
  nodes = 2 * num_pages
  drop = nodes + 4            # an index past every node array: masked writes go nowhere
  nowhere = num_blocks        # past the block table
  link_writes, list_writes = 7, 2  # writes per step to next/prev, to node_list

  def unlink(nxt, prv, n, cond):
    a, c = prv.get(n), nxt.get(n)
    nxt.put(a, c, cond)
    prv.put(c, a, cond)

  def push_front(nxt, prv, n, lst, cond):
    s = nodes + lst
    h = nxt.get(s)
    nxt.put(n, h, cond)
    prv.put(n, s, cond)
    nxt.put(s, n, cond)
    prv.put(h, n, cond)

  cap = capacity.astype(jnp.int32)
  capf = capacity.astype(jnp.float32)

  def step(carry, ref):
    block_node, node_block, node_list, nxt, prv, size, p, fresh, pending = carry
    x, part = ref
    # the previous reference's writes, then only reads
    old_key, new_key, new_node, w_nxt, w_prv, w_list = pending
    block_node = block_node.at[old_key].set(-1, mode="drop")
    block_node = block_node.at[new_key].set(new_node, mode="drop")
    node_block = node_block.at[jnp.where(new_key < nowhere, new_node, drop)].set(
        new_key, mode="drop")
    nxt, prv, node_list = _apply(nxt, w_nxt), _apply(prv, w_prv), _apply(node_list, w_list)
    carried = (block_node, node_block, node_list, nxt, prv)
    nxt, prv, node_list = _Overlay(nxt, drop), _Overlay(prv, drop), _Overlay(node_list, drop)

    n = block_node[x]
    tracked = n >= 0
    nn = jnp.maximum(n, 0)
    lx = jnp.where(tracked, node_list.get(nn), -1)
    hit = (lx == T1) | (lx == T2)
    skip = bypass & part & ~hit
    ghost1 = (lx == B1) & ~skip
    ghost2 = (lx == B2) & ~skip
    miss = ~tracked & ~skip
    # p adapts on a ghost hit
    s1, s2 = size[B1].astype(jnp.float32), size[B2].astype(jnp.float32)
    p = jnp.where(ghost1, jnp.minimum(capf, p + jnp.maximum(s2 / jnp.maximum(s1, 1.0), 1.0)),
                  p)
    p = jnp.where(ghost2, jnp.maximum(0.0, p - jnp.maximum(s1 / jnp.maximum(s2, 1.0), 1.0)),
                  p)
    # 1. x leaves its list (a hit or a ghost hit)
    moved = hit | ghost1 | ghost2
    unlink(nxt, prv, nn, moved)
    size = size.at[jnp.where(moved, lx, 4)].add(-1, mode="drop")
    # 2. a complete miss may delete the LRU key of B1, T1 or B2
    total = size.sum()  # read in the miss case only, where x is in no list
    case_a = miss & (size[T1] + size[B1] == cap)
    del_b1 = case_a & (size[T1] < cap)
    del_t1 = case_a & (size[T1] >= cap)
    case_c = miss & ~case_a & (total >= cap)
    del_b2 = case_c & (total == 2 * cap)
    deleting = del_b1 | del_t1 | del_b2
    d = jnp.where(del_b1, B1, jnp.where(del_t1, T1, B2))
    f = prv.get(nodes + d)
    unlink(nxt, prv, f, deleting)
    size = size.at[jnp.where(deleting, d, 4)].add(-1, mode="drop")
    old_key = jnp.where(deleting, node_block[jnp.minimum(f, nodes - 1)], nowhere)
    # 3. REPLACE: the LRU block of T1 or T2 becomes the MRU ghost of B1 or B2
    replacing = ghost1 | ghost2 | del_b1 | case_c
    t1 = size[T1].astype(jnp.float32)
    from_t1 = (t1 >= 1) & ((ghost2 & (t1 == p)) | (t1 > p))
    src = jnp.where(from_t1, T1, T2)
    r = prv.get(nodes + src)
    unlink(nxt, prv, r, replacing)
    push_front(nxt, prv, r, src + 2, replacing)
    node_list.put(r, src + 2, replacing)
    size = size.at[jnp.where(replacing, src, 4)].add(-1, mode="drop")
    size = size.at[jnp.where(replacing, src + 2, 4)].add(1, mode="drop")
    # 4. x becomes the MRU block of T1 (a complete miss) or T2
    inserting = ~skip
    node = jnp.where(miss, jnp.where(deleting, f, fresh), nn)
    dest = jnp.where(miss, T1, T2)
    push_front(nxt, prv, node, dest, inserting)
    node_list.put(node, dest, inserting)
    size = size.at[jnp.where(inserting, dest, 4)].add(1, mode="drop")
    fresh = fresh + (miss & ~deleting).astype(jnp.int32)
    pending = (old_key, jnp.where(miss, x, nowhere), node, nxt.writes(link_writes),
               prv.writes(link_writes), node_list.writes(list_writes))
    return (*carried, size, p, fresh, pending), hit

  z = jnp.int32(0)
  links = jnp.concatenate([jnp.zeros((nodes,), jnp.int32),
                           nodes + jnp.arange(4, dtype=jnp.int32)])
  none = lambda k: (jnp.full((k,), drop, jnp.int32), jnp.zeros((k,), jnp.int32))  # noqa: E731
  carry = (jnp.full((num_blocks,), -1, jnp.int32), jnp.full((nodes + 4,), -1, jnp.int32),
           jnp.full((nodes + 4,), -1, jnp.int32), links, links,
           jnp.zeros((4,), jnp.int32), jnp.float32(0.0), z,
           (z + nowhere, z + nowhere, z, none(link_writes), none(link_writes),
            none(list_writes)))
  return jax.lax.scan(step, carry, (blocks, partial))[1]


@functools.partial(jax.jit, static_argnames=("num_pages", "num_blocks"))
def _arc_batch(blocks, partial, capacities, bypass, *, num_pages: int, num_blocks: int):
  run = functools.partial(_arc_scan, num_pages=num_pages, num_blocks=num_blocks)
  return jax.vmap(run, in_axes=(None, None, 0, 0))(blocks, partial, capacities, bypass)


def arc_scan_hits(blocks, capacities, bypass=False, partial=None) -> np.ndarray:
  """bool numpy [V, N]: ARC's hit flags at each capacity, in one jitted, vmapped scan.

  Args:
    blocks: int [N] dense block ids in ``[0, num_blocks)`` (``Trace.block``).
    capacities: V positive ints.
    bypass: a bool or V bools (``arc-bypass`` where True).
    partial: bool [N] partial-block flags (required when any ``bypass``).

  Equal to ``arc_hits`` hit for hit (tested). One compilation per (largest capacity,
  number of distinct blocks, N, V).

  >>> arc_scan_hits(np.array([1, 2, 1, 3, 4, 1]), [2]).astype(int).tolist()
  [[0, 0, 1, 0, 0, 1]]
  """
  caps = [int(c) for c in capacities]
  if not caps or any(c <= 0 for c in caps):
    raise ValueError(f"capacities must be positive ints, got {capacities!r}")
  flags = [bool(bypass)] * len(caps) if np.ndim(bypass) == 0 else [bool(b) for b in bypass]
  if len(flags) != len(caps):
    raise ValueError(f"bypass must be one bool or {len(caps)}, got {len(flags)}")
  blocks = np.asarray(blocks, np.int32)
  if partial is None:
    if any(flags):
      raise ValueError("bypass needs partial (bool [N]: which references are partial blocks)")
    partial = np.zeros(blocks.shape, bool)
  num_blocks = int(blocks.max()) + 1 if blocks.size else 1
  hits = _arc_batch(jnp.asarray(blocks), jnp.asarray(partial, bool),
                    jnp.asarray(caps, jnp.int32), jnp.asarray(flags, bool),
                    num_pages=max(caps), num_blocks=num_blocks)
  return np.asarray(hits)
