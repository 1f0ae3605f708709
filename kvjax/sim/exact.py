"""O(1)-per-reference simulators of LRU and FIFO, exact, for long traces and sweeps.

The scoring path of ``kvjax.sim.simulator`` runs a policy's ``score`` over every page at
every miss: O(P) per reference, about 8 us at 6,144 pages on this CPU, slower than a
plain-Python ``OrderedDict``. LRU and FIFO need no scores to find their victim:

* **LRU** keeps the pages in a doubly linked list in arrays (``next``/``prev`` of
  int32 [P + 1], the last slot a sentinel whose ``next`` is the most recent page and
  whose ``prev`` the least recent), so a hit moves its page to the front and a miss
  evicts the tail in a constant number of gathers and scatters.
* **FIFO** writes the i-th inserted block into page ``i % capacity``: the page it
  overwrites holds the block inserted ``capacity`` insertions ago, the oldest one.

Both produce the same hit flags as the scoring path with ``lru``/``fifo`` (tests check
them against it and against plain Python, reference by reference). Pages fill in index
order and a block maps to a page through an int32 [num_blocks] table, so a lookup is one
gather.

One implementation detail carries the speed: XLA on CPU copies a carried array when a
value read from it in a step is used after the array is written in the same step. Each
step therefore first applies the previous reference's writes (carried as scalars) and
then only reads; with that, a step costs tens of nanoseconds instead of a copy of the
block table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EXACT_POLICIES = ("lru", "fifo")


def _lru_scan(blocks: jax.Array, capacity: jax.Array, num_pages: int, num_blocks: int):
  """bool [N] hit flags of LRU with ``capacity`` (<= num_pages) pages."""
  sentinel, drop, nowhere = num_pages, num_pages + 1, num_blocks

  def step(carry, b):
    block_page, page_block, nxt, prv, used, pending = carry
    x, a, c, head, linked, old, prev_b = pending
    # 1. The previous reference's writes: unlink its page x (when it was in the list),
    #    put it at the front, and update the block <-> page maps.
    nxt = nxt.at[jnp.where(linked, a, drop)].set(c, mode="drop")
    prv = prv.at[jnp.where(linked, c, drop)].set(a, mode="drop")
    nxt = nxt.at[x].set(head, mode="drop")
    nxt = nxt.at[jnp.where(x < drop, sentinel, drop)].set(x, mode="drop")
    prv = prv.at[x].set(sentinel, mode="drop").at[head].set(x, mode="drop")
    block_page = block_page.at[old].set(-1, mode="drop").at[prev_b].set(x, mode="drop")
    page_block = page_block.at[x].set(prev_b, mode="drop")
    # 2. This reference's reads; its writes travel to the next step.
    p = block_page[b]
    hit = p >= 0
    fresh = ~hit & (used < capacity)
    x = jnp.where(hit, p, jnp.where(fresh, used, prv[sentinel]))
    a, c, front = prv[x], nxt[x], nxt[sentinel]
    linked = ~fresh
    head = jnp.where(linked & (front == x), c, front)  # the front once x is unlinked
    old = jnp.where(hit | fresh, nowhere, page_block[x])
    pending = (x, a, c, head, linked, old, b)
    return (block_page, page_block, nxt, prv, used + fresh.astype(jnp.int32), pending), hit

  z = jnp.int32(0)
  links = jnp.full((num_pages + 1,), sentinel, jnp.int32)
  carry = (jnp.full((num_blocks,), -1, jnp.int32), jnp.full((num_pages,), -1, jnp.int32),
           links, links, z, (z + drop, z, z, z + drop, jnp.bool_(False), z + nowhere,
                             z + nowhere))
  return jax.lax.scan(step, carry, blocks)[1]


def _fifo_scan(blocks: jax.Array, capacity: jax.Array, num_pages: int, num_blocks: int):
  """bool [N] hit flags of FIFO with ``capacity`` (<= num_pages) pages."""
  nowhere = num_blocks

  def step(carry, b):
    block_page, page_block, inserted, pending = carry
    x, old, prev_b = pending
    block_page = block_page.at[old].set(-1, mode="drop").at[prev_b].set(x, mode="drop")
    page_block = page_block.at[x].set(prev_b, mode="drop")
    hit = block_page[b] >= 0
    x = jnp.where(hit, num_pages, inserted % capacity)
    old = jnp.where(hit, nowhere, page_block[jnp.minimum(x, num_pages - 1)])
    old = jnp.where(old < 0, nowhere, old)
    pending = (x, old, jnp.where(hit, nowhere, b))
    return (block_page, page_block, inserted + (~hit).astype(jnp.int32), pending), hit

  z = jnp.int32(0)
  carry = (jnp.full((num_blocks,), -1, jnp.int32), jnp.full((num_pages,), -1, jnp.int32), z,
           (z + num_pages, z + nowhere, z + nowhere))
  return jax.lax.scan(step, carry, blocks)[1]


_SCANS = {"lru": _lru_scan, "fifo": _fifo_scan}


@functools.partial(jax.jit, static_argnames=("policy", "num_pages", "num_blocks"))
def _hits(blocks, capacity, *, policy: str, num_pages: int, num_blocks: int):
  return _SCANS[policy](blocks, capacity, num_pages, num_blocks)


def exact_hits(blocks: np.ndarray, capacities: list[int], policy: str,
               num_blocks: int) -> np.ndarray:
  """bool numpy [V, N]: hit flags of ``policy`` ("lru" or "fifo") at each capacity.

  Args:
    blocks: int32 [N] dense block ids in ``[0, num_blocks)`` (``Trace.block``).
    capacities: V positive ints (pages the cache holds).
    policy: one of ``EXACT_POLICIES``.
    num_blocks: the number of distinct blocks (the block table's size).

  One compilation serves every capacity (arrays are sized by the largest, the capacity
  is a traced scalar); runs go one after another, each a scalar scan.

  >>> exact_hits(np.array([1, 2, 1, 3, 2], np.int32), [2], "lru", 4).astype(int).tolist()
  [[0, 0, 1, 0, 0]]
  """
  if policy not in _SCANS:
    raise ValueError(f"policy must be one of {EXACT_POLICIES} for the exact path, got "
                     f"{policy!r}")
  if any(isinstance(c, bool) or int(c) <= 0 for c in capacities):
    raise ValueError(f"capacities must be positive ints, got {capacities!r}")
  blocks = jnp.asarray(blocks, jnp.int32)
  size = max(int(c) for c in capacities)
  out = [_hits(blocks, jnp.int32(c), policy=policy, num_pages=size,
               num_blocks=max(int(num_blocks), 1)) for c in capacities]
  return np.stack([np.asarray(h) for h in out]) if out else np.zeros((0, blocks.shape[0]), bool)
