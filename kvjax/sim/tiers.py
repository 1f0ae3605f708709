"""An exact host model of the two-tier cache (``kvjax.tiers``) replaying a trace's requests.

Each request is served the way the real cache serves a prompt of one page per block:
the leading run of its blocks cached in L1, then the chain continued in L2 (promoted
into L1), then the rest computed into new L1 pages. The model keeps the same rules as
``kvjax.tiers`` and ``kvjax.cache`` (at block granularity, without page ids):

* **L1**: ``l1_pages`` pages; a request holds its blocks plus one partial page while it
  runs. Pages are taken free first, then from cached blocks by LRU (one clock shared by
  all processes: +1 at the attach, +1 at the plan; ties go deepest block first). An
  evicted block takes its cached L1 descendants with it (they can never be matched).
* **L2**: ``l2_pages`` pages, write-through: before each attach and each plan every L1
  block without a valid L2 copy whose parent has one gets a new L2 entry (stamped with
  the clock); L2 evicts by LRU over (stamp, deepest first), never an entry written in
  the same pass. An L1 hit refreshes its copy's stamp, a promotion stamps the entry.
  An evicted L2 entry's L2 descendants stay (taking space) but never match again and
  are no valid copy; a block whose copy is lost is written again at the next pass.
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
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.attach import attach_prefix as attach_l1
from kvjax.cache.config import CacheConfig
from kvjax.cache.lifecycle import release as release_l1
from kvjax.cache.plan import plan_step as plan_l1
from kvjax.cache.state import init as init_l1
from kvjax.sim.traces import Trace
from kvjax.tiers import ops as tier_ops
from kvjax.tiers.config import TierConfig
from kvjax.tiers.state import init as init_tiers


class _L2:
  """One L2 pool: entries (block, parent entry, position, stamp), LRU with lazy heap."""

  def __init__(self, pages: int):
    self.pages = pages
    self.entry = {}     # id -> [block, parent id, position, stamp, alive]
    self.kids = {}      # id -> set of child ids
    self.by_key = {}    # (block, parent id) -> id of a live entry
    self.heap = []      # (stamp, -position, id)
    self.holders = {}   # id -> set of (L1, block) whose copy it is
    self.next_id = 0

  def live(self, e: int) -> bool:
    x = self.entry.get(e)
    return x is not None and x[4]

  def stamp(self, e: int, t: int) -> None:
    x = self.entry[e]
    x[3] = t
    heapq.heappush(self.heap, (t, -x[2], e))

  def _kill(self, e: int) -> None:
    """Entry ``e`` and its descendants never match again; their copies are lost."""
    stack = [e]
    while stack:
      x = stack.pop()
      ent = self.entry[x]
      if not ent[4]:
        continue
      ent[4] = False
      if self.by_key.get((ent[0], ent[1])) == x:
        del self.by_key[(ent[0], ent[1])]
      for l1, b in self.holders.pop(x, ()):
        l1.lost(b, x)
      stack.extend(self.kids.get(x, ()))

  def evict_one(self, written: set) -> bool:
    """Drop the least recently stamped entry not in ``written``; False if none."""
    keep = []
    done = False
    while self.heap:
      t, negpos, e = heapq.heappop(self.heap)
      x = self.entry.get(e)
      if x is None or x[3] != t:
        continue  # stale heap item
      if e in written:
        keep.append((t, negpos, e))
        continue
      self._kill(e)
      par = x[1]
      if par in self.kids:
        self.kids[par].discard(e)
      for c in self.kids.pop(e, ()):
        self.entry[c][1] = -2  # orphaned: its parent left
      del self.entry[e]
      done = True
      break
    for item in keep:
      heapq.heappush(self.heap, item)
    return done

  def room(self, written: set) -> bool:
    """Make room for one entry (evicting one if full); False if every entry is in
    ``written``."""
    return len(self.entry) < self.pages or self.evict_one(written)

  def write(self, block: int, parent: int, position: int, t: int, written: set) -> int:
    """A new entry for ``block`` after entry ``parent`` (-1 = root), in a free page."""
    e = self.next_id
    self.next_id += 1
    self.entry[e] = [block, parent, position, t, True]
    self.kids.setdefault(parent, set()).add(e)
    self.by_key[(block, parent)] = e
    heapq.heappush(self.heap, (t, -position, e))
    written.add(e)
    return e


class _L1:
  """One L1 pool: cached blocks (a prefix tree), LRU with lazy heap, L2 copies."""

  def __init__(self, pages: int, l2: _L2):
    self.pages = pages
    self.l2 = l2
    self.node = {}      # block -> [stamp, position, parent block (-1 root), copy id or -1]
    self.kids = {}      # block -> set of child blocks
    self.heap = []      # (stamp, -position, block)
    self.held = set()   # blocks of the running request
    self.need = set()   # blocks without a valid L2 copy

  def lost(self, block: int, e: int) -> None:
    x = self.node.get(block)
    if x is not None and x[3] == e:
      x[3] = -1
      self.need.add(block)

  def stamp(self, block: int, t: int) -> None:
    x = self.node[block]
    x[0] = t
    heapq.heappush(self.heap, (t, -x[1], block))

  def copy_ok(self, block: int) -> bool:
    e = self.node[block][3]
    return e >= 0 and self.l2.live(e)

  def set_copy(self, block: int, e: int) -> None:
    self.node[block][3] = e
    self.need.discard(block)
    self.l2.holders.setdefault(e, set()).add((self, block))

  def add(self, block: int, position: int, parent: int, t: int) -> None:
    self.node[block] = [t, position, parent, -1]
    self.kids.setdefault(parent, set()).add(block)
    heapq.heappush(self.heap, (t, -position, block))
    self.need.add(block)

  def _drop(self, block: int) -> None:
    stack = [block]
    while stack:
      b = stack.pop()
      x = self.node.pop(b, None)
      if x is None:
        continue
      self.need.discard(b)
      if x[3] >= 0 and x[3] in self.l2.holders:
        self.l2.holders[x[3]].discard((self, b))
      sib = self.kids.get(x[2])
      if sib is not None:
        sib.discard(b)
      stack.extend(self.kids.pop(b, ()))

  def make_room(self, pages: int) -> None:
    """Evict LRU blocks (not held) until ``pages`` pages are free."""
    keep = []
    while self.pages - len(self.node) < pages and self.heap:
      t, negpos, b = heapq.heappop(self.heap)
      x = self.node.get(b)
      if x is None or x[0] != t:
        continue
      if b in self.held:
        keep.append((t, negpos, b))
        continue
      self._drop(b)
    for item in keep:
      heapq.heappush(self.heap, item)

  def sync(self, t: int) -> None:
    """Write-through pass: blocks without a valid copy get one, in position order."""
    written = set()
    heap = [(self.node[b][1], b) for b in self.need]
    heapq.heapify(heap)
    while heap:
      _, b = heapq.heappop(heap)
      x = self.node.get(b)
      if x is None or self.copy_ok(b):
        continue
      par = x[2]
      if par >= 0 and not self.copy_ok(par):
        continue
      parent_e = self.node[par][3] if par >= 0 else -1
      same = self.l2.by_key.get((b, parent_e))
      if same is not None:  # L2 holds it after this parent already: adopt that copy
        self.l2.stamp(same, t)
        written.add(same)
        self.set_copy(b, same)
        continue
      before = set(self.need)
      if not self.l2.room(written):
        continue
      if par >= 0 and not self.copy_ok(par):  # its parent's copy was the one evicted
        continue
      e = self.l2.write(b, self.node[par][3] if par >= 0 else -1, x[1], t, written)
      self.set_copy(b, e)
      for c in self.need - before:  # copies lost now, later in order: written now
        if self.node[c][1] >= x[1]:
          heapq.heappush(heap, (self.node[c][1], c))


def two_tier(trace: Trace, *, l1_pages: int, l2_pages: Optional[int],
             procs: Optional[Sequence[int]] = None, shared_l2: bool = True,
             requests: Optional[int] = None) -> dict:
  """Replay ``trace`` through the two-tier model; page hit counts.

  Args:
    trace: block references (one page per block).
    l1_pages: pages of each process's L1 (> the longest request).
    l2_pages: pages of the (each) L2; ``None`` or 0: L1 alone.
    procs: int [R] process of each request (default all 0).
    shared_l2: one L2 for all processes (else one each of ``l2_pages``).
    requests: replay only the first ``requests`` requests.

  Returns:
    ``{"lookups", "l1_hits", "l2_hits", "hit_ratio_l1", "hit_ratio_l1_l2"}`` (pages;
    ratios over lookups), plus ``"per_request"`` int [R, 2] (L1, L2 hits).
  """
  r_ = trace.num_requests if requests is None else min(int(requests), trace.num_requests)
  procs = np.zeros(r_, np.int64) if procs is None else np.asarray(procs)[:r_]
  n_proc = int(procs.max()) + 1 if r_ else 1
  use_l2 = bool(l2_pages)
  cap2 = int(l2_pages) if use_l2 else 1
  if shared_l2:
    one = _L2(cap2)
    l2s = [one] * n_proc
  else:
    l2s = [_L2(cap2) for _ in range(n_proc)]
  l1s = [_L1(int(l1_pages), l2s[i]) for i in range(n_proc)]
  bounds = np.searchsorted(trace.request, np.arange(r_ + 1))
  per = np.zeros((r_, 2), np.int64)
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
    if use_l2:
      prev = l1.node[blocks[c1 - 1]][3] if c1 else -1
      if c1 == 0 or (prev >= 0 and l2.live(prev)):
        for j in range(c1, n):
          e = l2.by_key.get((blocks[j], prev if j else -1))
          if e is None:
            break
          wanted.append(e)
          prev = e
      for b in blocks[:c1]:
        if l1.copy_ok(b):
          l2.stamp(l1.node[b][3], t + 1)
    l1.held = set(blocks[:c1])
    l1.make_room(len(wanted))
    for k, e in enumerate(wanted):
      j = c1 + k
      l1.add(blocks[j], j, blocks[j - 1] if j else -1, t + 1)
      l1.set_copy(blocks[j], e)
      l2.stamp(e, t + 1)
      l1.held.add(blocks[j])
    c = c1 + len(wanted)
    per[r] = (c1, len(wanted))
    t += 1  # the attach
    if use_l2:
      l1.sync(t)
    l1.make_room(n - c + 1)  # the new blocks and the partial page
    t += 1  # the plan
    for j in range(n):
      if j < c:
        l1.stamp(blocks[j], t)
      else:
        l1.add(blocks[j], j, blocks[j - 1] if j else -1, t)
    l1.held = set()
  lookups = int(bounds[r_] - bounds[0])
  h1, h2 = int(per[:, 0].sum()), int(per[:, 1].sum())
  q = max(lookups, 1)
  return {"lookups": lookups, "l1_hits": h1, "l2_hits": h2, "hit_ratio_l1": h1 / q,
          "hit_ratio_l1_l2": (h1 + h2) / q, "per_request": per, "pools": (l1s, l2s)}


def block_tokens(blocks: np.ndarray, page_size: int) -> np.ndarray:
  """int32 [n * page_size]: synthetic tokens of a request's blocks, one page per block,
  derived from the block ids (distinct blocks never share a page of tokens).

  >>> block_tokens(np.array([0, 2]), 2).tolist()
  [1, 2, 5, 6]
  """
  b = np.asarray(blocks, np.int64)
  return ((b[:, None] * page_size + np.arange(page_size)) + 1).reshape(-1).astype(np.int32)


def replay_cache(trace: Trace, *, l1_pages: int, l2_pages: Optional[int],
                 procs: Optional[Sequence[int]] = None, shared_l2: bool = True,
                 requests: Optional[int] = None, page_size: int = 4,
                 l2_preset: str = "bf16", min_pages_per_seq: int = 256,
                 prepare: Optional[Callable] = None) -> dict:
  """Replay ``trace`` through the REAL two-tier cache (``kvjax.tiers``); as ``two_tier``.

  Each request is one sequence: its prompt is one page of ``block_tokens`` per block and
  one more token (so every block is looked up); it is attached across tiers, its
  uncached tokens are planned (the model is not run: pages keep zeros) and it is
  released. A tiny layer/head configuration: the replay measures the cache. Processes
  (``procs``) each have their own L1 and, with ``shared_l2``, hand one L2 (``L2State``)
  to each other; one logical clock is shared (each process's L1 clock is set to it
  before a request). ``l2_pages`` ``None``/0: the L1 cache alone (``kvjax`` ops).
  Sequences get ``max(min_pages_per_seq, longest request + 1)`` page-table columns (one
  compiled shape for all replays). ``prepare(state, config, tiers)`` (optional) maps each
  process's initial state (to fill pages, or place it on a mesh); the final states are
  returned under ``"states"``.
  """
  r_ = trace.num_requests if requests is None else min(int(requests), trace.num_requests)
  procs = np.zeros(r_, np.int64) if procs is None else np.asarray(procs)[:r_]
  n_proc = int(procs.max()) + 1 if r_ else 1
  bounds = np.searchsorted(trace.request, np.arange(r_ + 1))
  longest = int(np.max(np.diff(bounds))) if r_ else 1
  cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, page_size=page_size,
                          num_pages=int(l1_pages), max_seqs=1,
                          max_pages_per_seq=max(min_pages_per_seq, longest + 1))
  width = max(min_pages_per_seq, longest + 1) * page_size
  use_l2 = bool(l2_pages)
  tc = TierConfig(l2_pages=int(l2_pages), l2_preset=l2_preset) if use_l2 else None
  if use_l2:
    states = [init_tiers(cfg, tc) for _ in range(n_proc)]
    if prepare is not None:
      states = [prepare(st, cfg, tc) for st in states]
    shared = [states[0].l2] if shared_l2 else None
  else:
    attach = jax.jit(attach_l1, static_argnames="config")
    plan = jax.jit(plan_l1, static_argnames="config")
    release = jax.jit(release_l1, static_argnames="config")
    states = [init_l1(cfg) for _ in range(n_proc)]
  per = np.zeros((r_, 2), np.int64)
  clock = 0
  one = jnp.array([0])
  for r in range(r_):
    p = int(procs[r])
    blocks = trace.block[bounds[r]:bounds[r + 1]]
    n = len(blocks)
    toks = block_tokens(blocks, page_size)
    prompt = np.zeros((1, width), np.int32)
    prompt[0, :n * page_size] = toks
    num = jnp.array([n * page_size + 1])
    st = states[p]
    if use_l2:
      st = st.replace(l1=st.l1.replace(clock=jnp.int32(clock)))
      if shared_l2:
        st = st.replace(l2=shared[0])
      before = (int(st.stats.l1_hit_pages), int(st.stats.l2_hit_pages))
      cached, st = tier_ops.attach_prefix(st, one, jnp.asarray(prompt), num, config=cfg, tiers=tc)
      per[r] = (int(st.stats.l1_hit_pages) - before[0], int(st.stats.l2_hit_pages) - before[1])
    else:
      st = st.replace(clock=jnp.int32(clock))
      cached, st = attach(st, one, jnp.asarray(prompt), num, config=cfg)
      per[r, 0] = int(cached[0]) // page_size
    c = int(cached[0])
    rest = np.zeros((1, width), np.int32)
    rest[0, :n * page_size - c] = toks[c:]
    if use_l2:
      st = tier_ops.plan_step(st, one, jnp.asarray(rest), num - c, config=cfg, tiers=tc)
      st = tier_ops.release(st, one, config=cfg)
      clock = int(st.l1.clock)
      if shared_l2:
        shared[0] = st.l2
    else:
      _, st = plan(st, one, jnp.asarray(rest), num - c, config=cfg)
      st = release(st, one, config=cfg)
      clock = int(st.clock)
    states[p] = st
  if use_l2 and shared_l2:
    states = [st.replace(l2=shared[0]) for st in states]
  lookups = int(bounds[r_] - bounds[0])
  h1, h2 = int(per[:, 0].sum()), int(per[:, 1].sum())
  q = max(lookups, 1)
  return {"lookups": lookups, "l1_hits": h1, "l2_hits": h2, "hit_ratio_l1": h1 / q,
          "hit_ratio_l1_l2": (h1 + h2) / q, "per_request": per, "states": states}
