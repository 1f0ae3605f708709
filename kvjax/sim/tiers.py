"""An exact host model of the tiered cache (``kvjax.tiers``, with ``kvjax.tiers.l3``)
replaying a trace's requests: plain Python, no jax (``kvjax.sim.replay`` runs the real
cache; the tests check the two agree hit for hit, request by request).

Each request is served the way the real cache serves a prompt of one page per block:
the leading run of its blocks cached in L1, then the chain continued in L2, then in L3
(into L2, then L1), then the rest computed into new L1 pages. The model keeps the same
rules as ``kvjax.tiers`` and ``kvjax.cache`` (at block granularity; L2 pages and L3
slots by number, where a tie is broken by one). A block id stands for its whole prefix
(as in the Mooncake trace: a hash id is chained over the blocks before it).

* **L1**: ``l1_pages`` pages; a request holds its blocks plus one partial page while it
  runs. Pages are taken free first, then from cached blocks by LRU (one clock shared by
  all processes: +1 at the attach, +1 at the plan; ties go deepest block first). An
  evicted block takes its cached L1 descendants with it (they can never be matched).
* **L2**: ``l2_pages`` numbered pages, write-through: before each attach and each plan
  (``sync``) every L1 block without a valid L2 copy whose parent has one gets a new L2
  entry (stamped with the clock), in position order, in the lowest free page, else in
  the page of L2's least recently used entry (by stamp, deepest first, lowest page),
  never an entry written in the same pass. An L1 hit refreshes its copy's stamp, a
  promotion stamps the entry. An evicted L2 entry's L2 descendants stay (taking space)
  but never match again and are no valid copy; a block whose copy is lost is written
  again at the next pass.
* **L3** (``l3_pages``, one process): a store of ``l3_pages`` numbered slots, LRU by
  its own clock (+1 per read batch, +1 per write batch; a write of a block it holds
  refreshes it), ties to the lowest slot; freed slots are reused last freed first.
  What goes down (``write``): ``"write_back"`` every L2 eviction (one batch per
  ``sync``, one per L3 promotion), ``"write_through"`` every new L2 entry (one batch per
  ``sync``, after that sync's evictions), ``"write_through_selective"`` a block once
  ``l3_hits`` attaches have served it (one batch per attach). Only an L2 entry whose
  chain is known goes down (written at the start, or after an entry whose chain is
  known, its parent still there at the end of the pass; or promoted from L3). Where L1
  and L2 run out, the chain continues with the blocks L3 lists (read as one batch:
  every listed block refreshed), as many as L2 can take: its free pages, then (evicted,
  in this order) entries outside this attach's chains, those copying no L1 block first,
  by stamp, lowest page first. The new entries follow the L2 entry of the block before
  (none: orphaned), stamped with the attach's clock, and are promoted into L1.
* **Processes**: ``procs[r]`` names the process serving request ``r``; each process
  has its own L1; ``shared_l2`` gives them one L2 of ``l2_pages``, otherwise each has a
  private L2 of ``l2_pages``.

>>> from kvjax.sim.traces import from_requests
>>> t = from_requests([[1, 2], [1, 2], [3], [1, 2]], [1024, 1024, 512, 1024])
>>> r = two_tier(t, l1_pages=3, l2_pages=8)
>>> r["lookups"], r["l1_hits"], r["l2_hits"]  # the last request finds block 2 in L2
(7, 3, 1)
"""

from __future__ import annotations

import heapq
from typing import Optional, Sequence

import numpy as np

from kvjax.sim.traces import Trace

WRITES = ("write_back", "write_through", "write_through_selective")


class _L3:
  """The block store: numbered slots, LRU by its own clock, ties to the lowest slot."""

  def __init__(self, slots: int):
    self.slots = slots
    self.slot_of = {}   # block -> slot
    self.last = {}      # slot -> last use (the clock of its last write or read)
    self.heap = []      # (last use, slot), lazy
    self.free = list(range(slots - 1, -1, -1))  # taken from the end
    self.block = {}     # slot -> block
    self.clock = 0
    self.writes = 0
    self.evictions = 0

  def _touch(self, slot: int) -> None:
    self.last[slot] = self.clock
    heapq.heappush(self.heap, (self.clock, slot))

  def read(self, blocks) -> None:
    """One read batch: the listed ``blocks`` are refreshed."""
    self.clock += 1
    for b in blocks:
      slot = self.slot_of.get(b)
      if slot is not None:
        self._touch(slot)

  def write(self, blocks) -> None:
    """One write batch: blocks held are refreshed, the others written (a repeat once)."""
    if not blocks:
      return
    self.clock += 1
    held = set()
    todo = []
    for b in blocks:
      slot = self.slot_of.get(b)
      if slot is not None:
        self._touch(slot)
        held.add(slot)
      elif b not in todo:
        todo.append(b)
    short = len(todo) - len(self.free)
    keep = []
    while short > 0 and self.heap:
      t, slot = heapq.heappop(self.heap)
      if self.last.get(slot) != t:
        continue   # stale heap item
      if slot in held:
        keep.append((t, slot))
        continue
      del self.slot_of[self.block[slot]]
      del self.last[slot]
      self.free.append(slot)
      self.evictions += 1
      short -= 1
    for item in keep:
      heapq.heappush(self.heap, item)
    if short > 0:   # as BlockStore.put: a batch the store cannot hold is an error
      raise ValueError(f"an L3 write of {len(todo)} new pages does not fit {self.slots} slots")
    for b in todo:
      slot = self.free.pop()
      self.slot_of[b] = slot
      self.block[slot] = b
      self._touch(slot)
      self.writes += 1


class _L2:
  """One L2 pool: entries (block, parent entry, position, stamp, page), LRU with a lazy
  heap, and under an L3 which entries' chains are known and which were evicted."""

  def __init__(self, pages: int, l3: Optional[_L3] = None, write: str = "write_back"):
    self.pages = pages
    self.entry = {}     # id -> [block, parent id (-1 root, -2 orphaned), position, stamp, page,
    #                      chain known]
    self.kids = {}      # id -> set of child ids
    self.by_key = {}    # (block, parent id) -> id
    self.heap = []      # (stamp, -position, page, id)
    self.holders = {}   # id -> set of (L1, block) whose copy it is
    self.free = list(range(pages))  # a heap of free pages
    self.next_id = 0
    self.l3 = l3
    self.write_mode = write
    self.gone = []      # blocks of evicted entries whose chain was known (since the last flush)

  def stamp(self, e: int, t: int) -> None:
    x = self.entry[e]
    x[3] = t
    heapq.heappush(self.heap, (t, -x[2], x[4], e))

  def evict(self, e: int) -> int:
    """Drop entry ``e``: its children are orphaned, the L1 copies naming it reset, its
    block goes to ``gone`` if its chain is known; returns its page."""
    x = self.entry.pop(e)
    if self.by_key.get((x[0], x[1])) == e:
      del self.by_key[(x[0], x[1])]
    if x[1] >= 0 and x[1] in self.kids:
      self.kids[x[1]].discard(e)
    for c in self.kids.pop(e, ()):
      y = self.entry[c]
      if self.by_key.get((y[0], e)) == c:
        del self.by_key[(y[0], e)]
      y[1] = -2
    for l1, b in self.holders.pop(e, ()):
      l1.node[b][3] = -1
    if x[5]:
      self.gone.append(x[0])
    return x[4]

  def victim(self, written: set) -> int:
    """The least recently stamped entry (deepest first, lowest page) not in ``written``;
    -1 if none."""
    keep = []
    out = -1
    while self.heap:
      t, negpos, page, e = self.heap[0]
      x = self.entry.get(e)
      if x is None or x[3] != t:
        heapq.heappop(self.heap)  # stale heap item
        continue
      if e in written:
        keep.append(heapq.heappop(self.heap))
        continue
      out = e
      break
    for item in keep:
      heapq.heappush(self.heap, item)
    return out

  def write(self, block: int, parent: int, position: int, t: int, page: int,
            known: bool = False) -> int:
    """A new entry for ``block`` after entry ``parent`` (-1 = root, -2 = orphaned) in
    ``page``."""
    e = self.next_id
    self.next_id += 1
    self.entry[e] = [block, parent, position, t, page, known]
    if parent != -2:
      self.kids.setdefault(parent, set()).add(e)
      self.by_key[(block, parent)] = e
    heapq.heappush(self.heap, (t, -position, page, e))
    return e

  def flush_gone(self) -> None:
    """``write_back``: the blocks evicted since the last flush go to L3 as one batch."""
    if self.l3 is not None and self.write_mode == "write_back":
      self.l3.write(self.gone)
    self.gone = []

  def inserted(self, new: list) -> None:
    """After a pass: which new entries' chains are known; ``write_through`` writes them."""
    down = []
    for e in new:
      x = self.entry[e]
      par = x[1]
      x[5] = (par == -1 and x[2] == 0) or (par >= 0 and self.entry[par][5])
      if x[5]:
        down.append(x[0])
    if self.l3 is not None and self.write_mode == "write_through":
      self.l3.write(down)

  def continue_chain(self, blocks: list, start: int, prev: int, keep: set, l1_pages: int,
                     t: int) -> list:
    """The blocks from ``start`` that L3 lists, read, into L2 entries (after entry
    ``prev``; -1 none); the new entries, in chain order."""
    n = 0
    while start + n < len(blocks) and blocks[start + n] in self.l3.slot_of:
      n += 1
    free = len(self.free)
    others = sum(1 for e in self.entry if e not in keep)
    n = min(n, free + others, l1_pages)
    if n == 0:
      return []
    self.l3.read(blocks[start:start + n])
    pages = [heapq.heappop(self.free) for _ in range(min(n, free))]
    if len(pages) < n:
      order = sorted((bool(self.holders.get(e)), x[3], x[4], e)
                     for e, x in self.entry.items() if e not in keep)
      victims = [e for *_, e in order[:n - len(pages)]]
      self.gone = []
      pages += [self.entry[e][4] for e in victims]
      for e in victims:
        self.evict(e)
      self.flush_gone()
    par = -1 if start == 0 else (prev if prev >= 0 else -2)
    out = []
    for i, page in enumerate(pages):
      j = start + i
      par = self.write(blocks[j], par, j, t, page, known=True)
      out.append(par)
    return out


class _L1:
  """One L1 pool: numbered pages, cached blocks (a prefix tree), LRU with a lazy heap,
  each block's L2 copy (an entry id, -1 none; checked at each pass as the cache does)."""

  def __init__(self, pages: int, l2: _L2):
    self.pages = pages
    self.l2 = l2
    self.node = {}      # block -> [stamp, position, parent block (-1 root), copy id or -1, page]
    self.kids = {}      # block -> set of child blocks
    self.heap = []      # (stamp, -position, page, block)
    self.free = list(range(pages))  # a heap of free pages
    self.held = set()   # blocks of the running request

  def stamp(self, block: int, t: int) -> None:
    x = self.node[block]
    x[0] = t
    heapq.heappush(self.heap, (t, -x[1], x[4], block))

  def set_copy(self, block: int, e: int) -> None:
    x = self.node[block]
    if x[3] >= 0 and x[3] in self.l2.holders:
      self.l2.holders[x[3]].discard((self, block))
    x[3] = e
    if e >= 0:
      self.l2.holders.setdefault(e, set()).add((self, block))

  def add(self, block: int, position: int, parent: int, t: int, page: int) -> None:
    self.node[block] = [t, position, parent, -1, page]
    self.kids.setdefault(parent, set()).add(block)
    heapq.heappush(self.heap, (t, -position, page, block))

  def _drop(self, block: int, reused: int) -> None:
    """Evict ``block`` (its page ``reused``); its cached descendants' pages become free."""
    stack = [block]
    while stack:
      b = stack.pop()
      x = self.node.get(b)
      if x is None:
        continue
      self.set_copy(b, -1)
      del self.node[b]
      if x[4] != reused:
        heapq.heappush(self.free, x[4])
      sib = self.kids.get(x[2])
      if sib is not None:
        sib.discard(b)
      stack.extend(self.kids.pop(b, ()))

  def take(self, k: int) -> list:
    """``k`` pages in the pool's order (free pages, lowest first, then cached blocks not
    held, least recently used first, deepest first, lowest page first), emptied."""
    out = []
    while len(out) < k and self.free:
      out.append(heapq.heappop(self.free))
    keep = []
    victims = []
    while len(out) + len(victims) < k and self.heap:
      t, negpos, page, b = heapq.heappop(self.heap)
      x = self.node.get(b)
      if x is None or x[0] != t or x[4] != page:
        continue
      if b in self.held:
        keep.append((t, negpos, page, b))
        continue
      victims.append((page, b))
    for item in keep:
      heapq.heappush(self.heap, item)
    for page, b in victims:
      self._drop(b, page)
      out.append(page)
    return out

  def order(self) -> list:
    """Cached blocks in (position, page) order."""
    return [b for _, _, b in sorted((x[1], x[4], b) for b, x in self.node.items())]

  def valid(self, order: list) -> dict:
    """{block: its copy is valid}: the entry follows the parent's copy, the whole chain."""
    ok = {}
    entry = self.l2.entry
    for b in order:
      x = self.node[b]
      e = x[3]
      par = x[2]
      want = -1 if par == -1 else self.node[par][3]
      ok[b] = e >= 0 and e in entry and entry[e][1] == want and (par == -1 or ok[par])
    return ok

  def revalidate(self) -> None:
    """Copies that are no longer valid are reset (after each plan, as the cache does)."""
    for b, good in self.valid(self.order()).items():
      if not good:
        self.set_copy(b, -1)

  def sync(self, t: int) -> None:
    """Write-through pass over the cached blocks in (position, page) order: a block is
    looked at if its copy was not valid at the start, or its or its parent's copy changed
    during the pass; then L3's hooks (the evicted entries, then the new ones)."""
    l2 = self.l2
    order = self.order()
    keep = self.valid(order)
    copy0 = {b: self.node[b][3] for b in order}
    written = set()
    new = []
    l2.gone = []
    for b in order:
      x = self.node[b]
      par = x[2]
      if keep[b] and x[3] == copy0[b] and (par < 0 or self.node[par][3] == copy0[par]):
        continue
      want = -1 if par == -1 else self.node[par][3]
      q = x[3]
      if q >= 0 and l2.entry[q][1] == want:
        continue
      self.set_copy(b, -1)
      if par >= 0 and want < 0:
        continue
      same = l2.by_key.get((b, want))
      if same is not None:  # L2 holds it after this parent already: adopt that copy
        l2.stamp(same, t)
        written.add(same)
        self.set_copy(b, same)
        continue
      if l2.free:
        page = heapq.heappop(l2.free)
      else:
        v = l2.victim(written)
        if v < 0:
          continue
        page = l2.evict(v)
        if par >= 0 and self.node[par][3] < 0:  # its parent's copy was the one evicted
          heapq.heappush(l2.free, page)
          continue
        want = -1 if par == -1 else self.node[par][3]
      e = l2.write(b, want, x[1], t, page)
      written.add(e)
      new.append(e)
      self.set_copy(b, e)
    l2.flush_gone()
    l2.inserted(new)


def hit_summary(per: np.ndarray, lookups: int) -> dict:
  """Totals and ratios of per-request hits ``per`` (int [R, 3]: L1, L2, L3) over ``lookups``.

  >>> hit_summary(np.array([[1, 0, 2], [0, 1, 0]]), 8)["hit_ratio"]
  0.5
  """
  h1, h2, h3 = (int(x) for x in per.sum(axis=0))
  q = max(lookups, 1)
  return {"lookups": lookups, "l1_hits": h1, "l2_hits": h2, "l3_hits": h3,
          "hit_ratio_l1": h1 / q, "hit_ratio_l2": h2 / q, "hit_ratio_l3": h3 / q,
          "hit_ratio_l1_l2": (h1 + h2) / q, "hit_ratio": (h1 + h2 + h3) / q}


def three_tier(trace: Trace, *, l1_pages: int, l2_pages: Optional[int],
               l3_pages: Optional[int] = None, write: str = "write_back", l3_hits: int = 1,
               procs: Optional[Sequence[int]] = None, shared_l2: bool = True,
               requests: Optional[int] = None) -> dict:
  """Replay ``trace`` through the tier model; page hit counts per tier.

  Args:
    trace: block references (one page per block).
    l1_pages: pages of each process's L1 (> the longest request).
    l2_pages: pages of the (each) L2; ``None`` or 0: L1 alone.
    l3_pages: slots of the L3 store (needs L2 and one process); ``None`` or 0: none.
    write: L3's write policy, one of ``WRITES``; l3_hits: the selective policy's count.
    procs: int [R] process of each request (default all 0).
    shared_l2: one L2 for all processes (else one each of ``l2_pages``).
    requests: replay only the first ``requests`` requests.

  Returns:
    ``{"lookups", "l1_hits", "l2_hits", "l3_hits", "hit_ratio_l1", "hit_ratio_l2",
    "hit_ratio_l3", "hit_ratio_l1_l2", "hit_ratio"}`` (pages; ratios over lookups,
    ``hit_ratio`` all tiers), ``"per_request"`` int [R, 3] (L1, L2, L3 hits),
    ``"l3_writes"`` / ``"l3_evictions"`` (pages) and ``"pools"``.

  >>> from kvjax.sim.traces import from_requests
  >>> t = from_requests([[1, 2], [3, 4], [5, 6], [1, 2]], [1024] * 4)
  >>> r = three_tier(t, l1_pages=3, l2_pages=2, l3_pages=8)
  >>> r["per_request"][-1].tolist()  # [1, 2] left L1 and L2, but L3 holds it
  [0, 0, 2]
  """
  if write not in WRITES:
    raise ValueError(f"write must be one of {WRITES}, got {write!r}")
  r_ = trace.num_requests if requests is None else min(int(requests), trace.num_requests)
  procs = np.zeros(r_, np.int64) if procs is None else np.asarray(procs)[:r_]
  n_proc = int(procs.max()) + 1 if r_ else 1
  use_l2 = bool(l2_pages)
  use_l3 = bool(l3_pages)
  if use_l3 and (not use_l2 or n_proc > 1):
    raise ValueError(f"l3_pages needs an L2 and one process, got l2_pages={l2_pages!r} and "
                     f"{n_proc} processes")
  l3 = _L3(int(l3_pages)) if use_l3 else None
  cap2 = int(l2_pages) if use_l2 else 1
  if shared_l2:
    one = _L2(cap2, l3, write)
    l2s = [one] * n_proc
  else:
    l2s = [_L2(cap2) for _ in range(n_proc)]
  l1s = [_L1(int(l1_pages), l2s[i]) for i in range(n_proc)]
  bounds = np.searchsorted(trace.request, np.arange(r_ + 1))
  per = np.zeros((r_, 3), np.int64)
  served_count = {}   # block -> attaches that served it (selective write-through)
  t = 0
  for r in range(r_):
    l1 = l1s[int(procs[r])]
    l2 = l1.l2
    blocks = trace.block[bounds[r]:bounds[r + 1]].tolist()
    n = len(blocks)
    if use_l2:
      l1.sync(t)
    c1 = 0
    while c1 < n and blocks[c1] in l1.node:
      c1 += 1
    wanted = []
    from_l3 = []
    if use_l2:
      prev = l1.node[blocks[c1 - 1]][3] if c1 else -1
      stop = c1
      if c1 == 0 or prev >= 0:
        for j in range(c1, n):
          e = l2.by_key.get((blocks[j], prev if j else -1))
          if e is None:
            break
          wanted.append(e)
          prev = e
          stop = j + 1
      if use_l3 and stop < n:
        keep = {l1.node[b][3] for b in blocks[:c1]} | set(wanted) | {prev}
        from_l3 = l2.continue_chain(blocks, stop, prev if stop else -1, keep, l1.pages, t)
      for b in blocks[:c1]:
        if l1.node[b][3] >= 0:
          l2.stamp(l1.node[b][3], t + 1)
    l1.held = set(blocks[:c1])
    pages = l1.take(len(wanted) + len(from_l3))
    for k, e in enumerate(wanted + from_l3):
      j = c1 + k
      l1.add(blocks[j], j, blocks[j - 1] if j else -1, t + 1, pages[k])
      l1.set_copy(blocks[j], e)
      l2.stamp(e, t + 1)
      l1.held.add(blocks[j])
    c = c1 + len(wanted) + len(from_l3)
    per[r] = (c1, len(wanted), len(from_l3))
    if use_l3 and write == "write_through_selective":
      hot = []
      for b in blocks[:c]:
        served_count[b] = served_count.get(b, 0) + 1
        if served_count[b] >= l3_hits and b not in l3.slot_of:
          hot.append(b)
      l3.write(hot)
    t += 1  # the attach
    if use_l2:
      l1.sync(t)
    pages = l1.take(n - c + 1)  # the new blocks and the partial page
    t += 1  # the plan
    for j in range(n):
      if j < c:
        l1.stamp(blocks[j], t)
      else:
        l1.add(blocks[j], j, blocks[j - 1] if j else -1, t, pages[j - c])
    heapq.heappush(l1.free, pages[-1])  # the partial page, freed at the release
    if use_l2:
      l1.revalidate()
    l1.held = set()
  return {**hit_summary(per, int(bounds[r_] - bounds[0])),
          "per_request": per, "l3_writes": l3.writes if l3 else 0,
          "l3_evictions": l3.evictions if l3 else 0, "pools": (l1s, l2s, l3)}


def two_tier(trace: Trace, *, l1_pages: int, l2_pages: Optional[int],
             procs: Optional[Sequence[int]] = None, shared_l2: bool = True,
             requests: Optional[int] = None) -> dict:
  """Replay ``trace`` through the two-tier model: ``three_tier`` without L3 (same arguments).

  Returns:
    ``{"lookups", "l1_hits", "l2_hits", "hit_ratio_l1", "hit_ratio_l1_l2"}`` (pages;
    ratios over lookups), plus ``"per_request"`` int [R, 2] (L1, L2 hits).
  """
  out = three_tier(trace, l1_pages=l1_pages, l2_pages=l2_pages, procs=procs,
                   shared_l2=shared_l2, requests=requests)
  out["per_request"] = out["per_request"][:, :2]
  return out
