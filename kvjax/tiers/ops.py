"""Two-tier cache operations: host wrappers that keep L2 in step with L1.

Demotion is write-through: before any L1 operation that can evict (``plan_step``,
``attach_prefix``, ``relieve``), every indexed full L1 page without a valid L2
copy is copied into L2 (``sync``), so an L1 eviction never loses a cached block
that L2 can hold. ``attach_prefix`` matches a prompt's blocks in L1, then
continues the chain in L2, promotes those pages into L1 and lets L1's own
``attach_prefix`` (with its verification) serve the whole run.

Verification in L2 is structural: an L2 page serves block ``j`` of a prompt only
if its tokens equal the block, its position is ``j``, its namespace is the
row's seed and its parent is the L2 page that served (or copies the L1 page
that served) block ``j - 1`` (-1 at ``j = 0``). The hash is never trusted, so a
colliding ``hash_fn`` can shorten a match but never hand out another
sequence's or tenant's page.

>>> import jax.numpy as jnp
>>> import kvjax
>>> from kvjax.tiers.config import TierConfig
>>> from kvjax.tiers.state import init
>>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
...                         num_pages=4, max_seqs=2, max_pages_per_seq=3)
>>> tc = TierConfig(l2_pages=8, l2_preset="bf16")
>>> prompt = jnp.array([[1, 2, 3, 4, 5]])
>>> ts = plan_step(init(cfg, tc), jnp.array([0]), prompt, jnp.array([5]), config=cfg, tiers=tc)
>>> ts = release(ts, jnp.array([0]), config=cfg)
>>> cached, ts = attach_prefix(ts, jnp.array([1]), prompt, jnp.array([5]), config=cfg, tiers=tc)
>>> cached.tolist()
[4]
"""

from __future__ import annotations

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.attach import attach_prefix as attach_l1
from kvjax.cache.config import CacheConfig
from kvjax.cache.lifecycle import fork as fork_l1
from kvjax.cache.lifecycle import release as release_l1
from kvjax.cache.plan import plan_step as plan_l1
from kvjax.cache.pool import reclaim
from kvjax.cache.pool import victims
from kvjax.cache.state import default_seed
from kvjax.cache.state import row_seeds
from kvjax.layout.meta import PageMeta
from kvjax.prefix.index import index_insert
from kvjax.prefix.index import index_lookup
from kvjax.pressure import evict_ahead
from kvjax.pressure import level as pressure_level
from kvjax.pressure import relieve as relieve_l1
from kvjax.tiers.config import TierConfig
from kvjax.tiers.move import keep_placement
from kvjax.tiers.move import move_into
from kvjax.tiers.move import pad_ids
from kvjax.tiers.move import page_bytes
from kvjax.tiers.move import pow2_at_least
from kvjax.tiers.state import TieredState
from kvjax.tiers.state import TierStats

# L1's operations, jitted once per config (eager calls would compile their conds each time)
_plan_l1 = jax.jit(plan_l1, static_argnames="config")
_attach_l1 = jax.jit(attach_l1, static_argnames="config")
_attach_l1_donated = jax.jit(attach_l1, static_argnames="config", donate_argnames="state")
_release_l1 = jax.jit(release_l1, static_argnames="config")
_fork_l1 = jax.jit(fork_l1, static_argnames="config")
_victims = jax.jit(victims, static_argnames=("k", "config"))
_reclaim = jax.jit(reclaim, static_argnames="config")
_reclaim_donated = jax.jit(reclaim, static_argnames="config", donate_argnames="state")
_index_lookup = jax.jit(index_lookup)
_index_insert = jax.jit(index_insert)
_relieve_l1 = jax.jit(relieve_l1, static_argnames=("config", "pressure", "demote_to", "limit"))
log = logging.getLogger(__name__)
PAD = 32  # page lists are padded to powers of two >= PAD: few compiled sizes
_POS = 1 << 20  # L2 eviction order: (last_access, deepest position first) as one int64 key

def host_meta(meta: PageMeta) -> dict:
  """{field: writable numpy copy} of a ``PageMeta``."""
  return {n: np.array(getattr(meta, n)) for n in PageMeta.__dataclass_fields__}


def put_like(a: np.ndarray, like) -> jax.Array:
  """``a`` on the device(s), placed as ``like`` where that spans several devices.

  A state placed on a mesh (``kvjax.tiers.placement``, ``kvjax.tiers.distributed``)
  keeps its shardings, so L1's jitted operations see the same input types and do not
  compile again; across processes each one fills its own shards (no collective).
  """
  sharding = getattr(like, "sharding", None)
  if sharding is None or len(sharding.device_set) == 1:
    return jax.device_put(np.asarray(a))
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def device_meta(m: dict, like: PageMeta | None = None) -> PageMeta:
  """A ``PageMeta`` from ``host_meta``'s dict, placed as ``like`` (see ``put_like``)."""
  if like is None:
    return PageMeta(**{n: jax.device_put(np.asarray(a)) for n, a in m.items()})
  return PageMeta(**{n: put_like(a, getattr(like, n)) for n, a in m.items()})


@jax.jit
def _add_counts(stats: TierStats, inc: jax.Array) -> TierStats:
  """``stats`` with int32 [F] ``inc`` added, in ``TierStats`` field order."""
  names = list(TierStats.__dataclass_fields__)
  return stats.replace(**{n: getattr(stats, n) + inc[i] for i, n in enumerate(names)})


def add_stats(ts: TieredState, **inc) -> TieredState:
  """``ts`` with counters increased by ``inc`` ({name: int}); one jitted add."""
  names = list(TierStats.__dataclass_fields__)
  vec = np.zeros((len(names),), np.int32)
  for n, v in inc.items():
    vec[names.index(n)] = v
  return ts.replace(stats=_add_counts(ts.stats, jax.device_put(vec)))


def full_hashed(m: dict, page_size: int) -> np.ndarray:
  """bool [P]: indexed full pages (hash set, full, not orphaned)."""
  return np.any(m["block_hash"] != 0, axis=-1) & (m["filled"] == page_size) & (m["parent"] != -2)


def same_block(m1: dict, p: int, m2: dict, q: int) -> bool:
  """Whether L1 page ``p`` and L2 page ``q`` record the same block (all but the parent)."""
  return (m2["filled"][q] == m1["filled"][p] and m2["position"][q] == m1["position"][p]
          and np.array_equal(m2["tokens"][q], m1["tokens"][p])
          and np.array_equal(m2["namespace"][q], m1["namespace"][p])
          and np.array_equal(m2["block_hash"][q], m1["block_hash"][p]))


def evict_l2(m2: dict, copy: np.ndarray, q: int) -> None:
  """Empty L2 page ``q`` in place: its children are orphaned, L1 copies pointing to it reset."""
  m2["parent"][m2["parent"] == q] = -2
  copy[copy == q] = -1
  m2["filled"][q] = 0
  m2["block_hash"][q] = 0
  m2["tokens"][q] = -1
  m2["parent"][q] = -1


def chain_valid(m1: dict, m2: dict, copy: np.ndarray, hashed: np.ndarray) -> np.ndarray:
  """bool [P1]: L1 pages whose L2 copy is valid, the whole chain down from its root.

  A copy is valid when the L1 page is indexed and full, the L2 page records the same
  block, and its L2 parent is the (valid) copy of the L1 parent (-1 at a start). The
  local check is vectorized; validity then propagates down the parent chains by pointer
  jumping (log2 of the longest chain rounds).
  """
  q = np.clip(copy, 0, None)
  par = m1["parent"]
  want = np.where(par == -1, -1, np.where(par >= 0, copy[np.clip(par, 0, None)], -3))
  ok = (hashed & (copy >= 0) & (m2["filled"][q] == m1["filled"])
        & (m2["position"][q] == m1["position"]) & (m2["parent"][q] == want)
        & np.all(m2["tokens"][q] == m1["tokens"], axis=-1)
        & np.all(m2["namespace"][q] == m1["namespace"], axis=-1)
        & np.all(m2["block_hash"][q] == m1["block_hash"], axis=-1))
  up = np.where(par >= 0, par, np.arange(par.shape[0]))  # roots point at themselves
  while True:
    nxt = ok & ok[up]
    up2 = up[up]
    if np.array_equal(nxt, ok) and np.array_equal(up2, up):
      return ok
    ok, up = nxt, up2


def revalidate(ts: TieredState, *, config: CacheConfig) -> TieredState:
  """``ts`` with ``l1_copy`` reset for L1 pages whose L2 copy no longer records their block.

  Checked in position order: a copy is valid when the L2 page records the same
  block and its parent is the copy of the L1 page's parent (-1 at a start).
  """
  m1 = host_meta(ts.l1.meta)
  m2 = host_meta(ts.l2.meta)
  copy = np.array(ts.l1_copy)
  copy[~chain_valid(m1, m2, copy, full_hashed(m1, config.page_size))] = -1
  return ts.replace(l1_copy=put_like(copy, ts.l1_copy))


def sync(ts: TieredState, *, config: CacheConfig, tiers: TierConfig,
         donate: bool = False) -> TieredState:
  """Write-through demotion: every indexed full L1 page gets a valid L2 copy where it can.

  A copy is valid while the L2 page records the same block and its parent is
  the copy of the L1 page's parent (checked in position order, so by induction
  the whole chain is). A page whose parent has no copy is not demoted (L2 could
  not verify it). A block L2 already holds after the same parent (another
  process sharing L2 demoted it) is adopted as the copy, not written again.
  Otherwise L2 takes free pages first, then its least recently used ones (by
  last access, deepest block first; not those written in this call).

  ``donate``: L2's pools are updated in place (``ts`` is invalid afterwards; the tiered
  host loops, which thread their state as the plain loop's donated steps do).

  >>> import jax.numpy as jnp
  >>> import kvjax
  >>> from kvjax.tiers.state import init
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> tc = TierConfig(l2_pages=4)
  >>> ts = plan_step(init(cfg, tc), jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]),
  ...                config=cfg, tiers=tc)
  >>> int(sync(ts, config=cfg, tiers=tc).stats.demotions)
  1
  """
  s = config.page_size
  m1 = host_meta(ts.l1.meta)
  m2 = host_meta(ts.l2.meta)
  copy = np.array(ts.l1_copy)
  hashed = full_hashed(m1, s)
  order = np.argsort(m1["position"], kind="stable")
  copy[~hashed] = -1
  copy0 = copy.copy()
  keep = chain_valid(m1, m2, copy, hashed)  # valid before this call; rechecked if touched
  parent = m1["parent"]
  clock = int(ts.l1.clock)
  written = np.zeros((tiers.l2_pages,), bool)
  src, dst = [], []
  evicted = 0
  gone = []  # L3 records of the L2 pages evicted here (kvjax.tiers.l3)
  for p in order[hashed[order]]:
    p = int(p)
    par = int(parent[p])
    if keep[p] and copy[p] == copy0[p] and (par < 0 or copy[par] == copy0[par]):
      continue
    par = int(m1["parent"][p])
    want_parent = -1 if par == -1 else int(copy[par]) if par >= 0 else -3
    q = int(copy[p])
    if q >= 0 and same_block(m1, p, m2, q) and int(m2["parent"][q]) == want_parent:
      continue
    copy[p] = -1
    if want_parent < -1 or (par == -1) != (m1["position"][p] == 0) or (par >= 0 and
                                                                        want_parent < 0):
      continue
    same = find_l2(m2, m1["tokens"][p], int(m1["position"][p]), want_parent,
                   m1["namespace"][p], s)[0]
    if same >= 0:  # L2 holds this block after this parent already (another process's copy)
      m2["last_access"][same] = clock
      written[same] = True
      copy[p] = same
      continue
    free = np.flatnonzero((m2["filled"] == 0) & ~written)
    if free.size:
      q = int(free[0])
    else:
      age = np.where(written, np.iinfo(np.int64).max,
                     m2["last_access"].astype(np.int64) * _POS - m2["position"])
      q = int(np.argmin(age))
      if written[q]:
        continue
      if ts.l3 is not None:  # L3 hook: the evicted page goes down (its policy permitting)
        gone.append(ts.l3.record(m2, q))
      evict_l2(m2, copy, q)
      evicted += 1
      if par >= 0 and copy[par] < 0:  # its own parent was just evicted
        continue
      want_parent = -1 if par == -1 else int(copy[par])
    for n in ("block_hash", "tokens", "position", "filled", "namespace"):
      m2[n][q] = m1[n][p]
    m2["parent"][q] = want_parent
    m2["ref_count"][q] = 0
    m2["last_access"][q] = clock
    m2["access_count"][q] = 1
    written[q] = True
    copy[p] = q
    src.append(p)
    dst.append(q)
  if ts.l3 is not None:  # L3 hooks: evicted pages (still in ts.l2), then the new L2 pages
    ts = ts.l3.demote(ts, gone)
    ts = ts.l3.inserted(ts, m2, src, dst)
  l2 = ts.l2.replace(meta=device_meta(m2, ts.l2.meta))
  if src:
    k, v = keep_placement(move_into(ts.l1.k, ts.l1.v, l2.k, l2.v, pad_ids(src, 0, PAD),
                                    pad_ids(dst, tiers.l2_pages, PAD), donate=donate),
                          (l2.k, l2.v))
    l2 = l2.replace(k=k, v=v)
  ts = ts.replace(l2=l2, l1_copy=put_like(copy, ts.l1_copy))
  nbytes = len(src) * (page_bytes(l2.k) + page_bytes(l2.v))
  return add_stats(ts, demotions=len(src), bytes_demoted=nbytes, l2_evictions=evicted)


def find_l1(m1: dict, hashed: np.ndarray, blk, j: int, parent: int, seed) -> int:
  """The L1 page that verifies as block ``j`` after ``parent`` (-1 = none)."""
  ok = (hashed & (m1["position"] == j) & (m1["parent"] == parent)
        & np.all(m1["tokens"] == blk, axis=-1) & np.all(m1["namespace"] == seed, axis=-1))
  hits = np.flatnonzero(ok)
  return int(hits[0]) if hits.size else -1


def find_l2(m2: dict, blk, j: int, parent: int, seed, s: int) -> tuple[int, int]:
  """(the L2 page verifying as block ``j`` after L2 page ``parent`` or -1, rejected candidates).

  A rejected candidate is a full L2 page at position ``j`` with the block's tokens
  that fails the namespace or parent check.
  """
  base = (m2["filled"] == s) & (m2["position"] == j) & np.all(m2["tokens"] == blk, axis=-1)
  ok = base & (m2["parent"] == parent) & np.all(m2["namespace"] == seed, axis=-1)
  hits = np.flatnonzero(ok)
  return (int(hits[0]) if hits.size else -1), int(np.sum(base & ~ok))


def attach_prefix(ts: TieredState, seq_ids, tokens, num_tokens, seeds=None, *,
                  config: CacheConfig, tiers: TierConfig, donate: bool = False):
  """Start empty sequences on the longest verified prefix across L1 and L2.

  Arguments as ``kvjax.cache.attach_prefix`` (``seq_ids`` int [B], ``tokens`` int
  [B, T], ``num_tokens`` int [B], ``seeds`` uint32 [B, 2] / [2] / None). Blocks
  found in L2 are promoted into L1 pages (taken through L1's pool: free pages
  first, then evictions, whose pages ``sync`` has already demoted), then L1's
  ``attach_prefix`` serves the run. Counters: ``l1_hit_*`` + ``l2_hit_*`` equal
  the pages/tokens served. ``donate``: the pools are updated in place, not copied per
  page move (``ts`` is invalid afterwards: the tiered host loops).

  Returns:
    ``(cached int32 [B], state)``.
  """
  ts = sync(ts, config=config, tiers=tiers, donate=donate)
  s = config.page_size
  ids = np.asarray(seq_ids).reshape(-1)
  toks = np.asarray(tokens)
  nt = np.asarray(num_tokens).reshape(-1)
  b = ids.shape[0]
  seed_rows = np.asarray(row_seeds(seeds, b))
  default = np.asarray(default_seed(config))
  m1 = host_meta(ts.l1.meta)
  m2 = host_meta(ts.l2.meta)
  copy = np.array(ts.l1_copy)
  hashed = full_hashed(m1, s)
  lens = np.asarray(ts.l1.seq_lens)
  l1_match = np.zeros((b,), np.int64)
  l2_match = np.zeros((b,), np.int64)
  lookups = 0
  rejected = 0
  protect = set()
  wanted = []  # (row, block j, L2 page, L1 parent page or None = promoted earlier in list)
  for r in range(b):
    if ids[r] < 0 or ids[r] >= lens.shape[0] or lens[ids[r]] != 0:
      continue
    seed = seed_rows[r] if np.any(seed_rows[r] != 0) else default
    blocks = max(int(nt[r]) - 1, 0) // s
    lookups += blocks
    prev1, prev2, in_l1 = -1, -1, True
    stop = blocks  # the first block neither L1 nor L2 serves
    for j in range(blocks):
      blk = toks[r, j * s:(j + 1) * s]
      if in_l1:
        p = find_l1(m1, hashed, blk, j, prev1, seed)
        if p >= 0:
          protect.add(p)
          prev1, prev2 = p, int(copy[p])
          l1_match[r] += 1
          continue
        in_l1 = False
      if j > 0 and prev2 < 0:
        stop = j
        break
      q, bad = find_l2(m2, blk, j, prev2 if j > 0 else -1, seed, s)
      rejected += bad
      if q < 0:
        stop = j
        break
      wanted.append((r, j, q, prev1 if len(wanted) == 0 or wanted[-1][0] != r else None))
      l2_match[r] += 1
      prev2 = q
    if ts.l3 is not None and stop < blocks:  # L3 hook: continue the chain from L3 into L2
      ts = ts.l3.continue_chain(ts, m2, copy, wanted, protect, row=r, tokens=toks[r], seed=seed,
                                start=stop, blocks=blocks, prev1=prev1,
                                prev2=prev2 if stop > 0 else -1, donate=donate)
  ts = add_stats(ts, verify_failures=rejected)
  hit_copies = copy[list(protect)] if protect else np.zeros(0, np.int64)
  m2["last_access"][hit_copies[hit_copies >= 0]] = int(ts.l1.clock) + 1  # L2 recency: LRU
  ts = promote(ts, wanted, protect, m2, config=config, tiers=tiers, donate=donate)
  ts = ts.replace(l2=ts.l2.replace(meta=device_meta(m2, ts.l2.meta)))
  cached, l1 = (_attach_l1_donated if donate else _attach_l1)(ts.l1, seq_ids, tokens, num_tokens,
                                                               seeds, config=config)
  served = np.asarray(cached) // s
  h1 = np.minimum(served, l1_match)
  h2 = np.minimum(served - h1, l2_match)
  h3 = served - h1 - h2
  ts = ts.replace(l1=l1)
  ts = add_stats(ts, lookups_pages=lookups, lookups_tokens=lookups * s,
                 l1_hit_pages=int(h1.sum()), l2_hit_pages=int(h2.sum()),
                 l1_hit_tokens=int(h1.sum()) * s, l2_hit_tokens=int(h2.sum()) * s,
                 l3_hit_pages=int(h3.sum()), l3_hit_tokens=int(h3.sum()) * s)
  if ts.l3 is not None:  # L3 hook: hit counts (selective write-through), exact L1 copies
    ts = ts.l3.served(ts, ids, toks, served, seed_rows, default, config=config, donate=donate)
  return cached, ts


def promote(ts: TieredState, wanted, protect, m2: dict, *, config: CacheConfig,
            tiers: TierConfig, donate: bool = False) -> TieredState:
  """Copy the L2 pages of ``wanted`` into L1 pages taken through L1's pool; index them.

  ``wanted``: (row, block, L2 page, L1 parent page or None = the previous entry's
  promoted page) in chain order. L1 pages in ``protect`` (matched prefixes) are
  never taken. A chain stops at the first block that gets no page or whose hash
  L1's index already holds.
  """
  if not wanted:
    return ts
  s = config.page_size
  l1 = ts.l1
  done = {}  # L2 page -> L1 page (a block two rows share is promoted once)
  need = len({q for _, _, q, _ in wanted})
  ref = np.array(l1.meta.ref_count)
  clock = int(l1.clock)   # on the host: a donated reclaim takes l1's arrays
  held = ref.copy()
  for p in protect:
    held[p] += 1
  probe = l1.replace(meta=l1.meta.replace(ref_count=jax.device_put(np.asarray(held))))
  k = min(need, config.num_pages)
  k_pad = min(config.num_pages, pow2_at_least(k, PAD))
  pages, ok = _victims(probe, k=k_pad, clock=l1.clock, config=config)
  take = np.asarray(pages)[:k][np.asarray(ok)[:k]]
  if take.size:
    # donated: reclaim touches no page data, and its copy of both pools is what it cost
    probe = (_reclaim_donated if donate else _reclaim)(
        probe, pad_ids(take, config.num_pages, PAD), clock=jax.device_put(np.int32(clock)),
        config=config).state
  m1 = host_meta(probe.meta)
  m1["ref_count"] = ref
  index = probe.index
  copy = np.array(ts.l1_copy)
  copy[take] = -1
  free = list(int(p) for p in take)
  src, dst = [], []
  hashes, values = [], []
  dead_rows = set()
  last = None
  qs = [q for _, _, q, _ in wanted]
  known_all = np.asarray(_index_lookup(index, pad_hashes(m2["block_hash"][qs])))
  for i, (r, j, q, par) in enumerate(wanted):
    if r in dead_rows:
      continue
    if par is None:
      par = last
    if q in done:
      last = done[q]
      continue
    h = m2["block_hash"][q]
    known = int(known_all[i])
    if not free or known >= 0 or any(np.array_equal(h, x) for x in hashes):
      dead_rows.add(r)
      continue
    p = free.pop(0)
    for n in ("block_hash", "tokens", "position", "namespace"):
      m1[n][p] = m2[n][q]
    m1["filled"][p] = s
    m1["parent"][p] = par
    m1["last_access"][p] = clock
    m1["access_count"][p] = 1
    m2["last_access"][q] = clock + 1  # the attach's time, as for L1 hits' copies
    copy[p] = q
    done[q] = p
    last = p
    src.append(q)
    dst.append(p)
    hashes.append(h)
    values.append(p)
  if hashes:
    n = int(pad_ids(values, -1).shape[0])
    h = np.zeros((n, 2), np.uint32)     # (0, 0) and -1 pad items are ignored
    h[:len(hashes)] = np.stack(hashes)
    index, _ = _index_insert(index, jax.device_put(h), pad_ids(values, -1))
  k, v = probe.k, probe.v   # l1's pools (reclaim's copies, or the same buffers donated)
  if src:
    k, v = keep_placement(move_into(ts.l2.k, ts.l2.v, k, v, pad_ids(src, 0, PAD),
                                    pad_ids(dst, config.num_pages, PAD), donate=donate), (k, v))
  l1 = probe.replace(meta=device_meta(m1, probe.meta), index=index, k=k, v=v)
  ts = ts.replace(l1=l1, l2=ts.l2.replace(meta=device_meta(m2, ts.l2.meta)),
                  l1_copy=put_like(copy, ts.l1_copy))
  nbytes = len(src) * (page_bytes(k) + page_bytes(v))
  return add_stats(ts, promotions=len(src), bytes_promoted=nbytes)


PRECOMPILED_INSERTS = (8, 16, 32)   # promote's index inserts: the padded sizes warmed


def precompile(ts: TieredState, *, config: CacheConfig, donate: bool = False,
               attach: tuple[int, int] | None = None) -> threading.Thread:
  """Start compiling, in a thread, the programs an attach that promotes pages into L1
  calls (L1's victims and reclaim, its index lookup and inserts), at the padded sizes
  the host loops use; the thread is returned started (``join`` it before exiting, so a
  program it compiles reaches JAX's persistent cache). Nothing runs on the state: only
  its shapes are read, now, so the caller may go on with ``ts`` at once.

  Why: only a run whose prompts hit L2 or L3 pages reaches these programs, so a first
  run with an empty L3 compiles none of them and the next one paid for them before its
  first token (``reclaim`` 0.52 s, ``index_insert`` 0.51 s, ``index_lookup`` 0.18 s,
  ``victims`` 0.07 s on the 2-core CPU); warm, their first calls still trace and load
  them. Compiled here, beside the model's load and the first prefill, a later call finds
  them lowered and compiled. A size the loops do not use would only be wasted work.
  ``attach``: ``(rows, width)``, also L1's attach of ``rows`` prompts padded to ``width``
  tokens without seeds (the host loops' first call of a batch).

  >>> import kvjax
  >>> from kvjax.tiers.state import init
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> precompile(init(cfg, TierConfig(l2_pages=4)), config=cfg).join()
  """
  def spec(a):   # a state on one device is passed uncommitted (no sharding in the key)
    sharding = getattr(a, "sharding", None)
    if sharding is not None and len(sharding.device_set) == 1:
      sharding = None
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  st = jax.tree.map(spec, ts.l1)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)    # noqa: E731
  u32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.uint32)   # noqa: E731
  # promote's victims for <= PAD pages, and their ids padded to PAD (pad_ids)
  reclaim_ = _reclaim_donated if donate else _reclaim
  jobs = [lambda: _victims.lower(st, k=min(config.num_pages, PAD), clock=i32(), config=config),
          lambda: reclaim_.lower(st, i32(PAD), clock=i32(), config=config),
          lambda: _index_lookup.lower(st.index, u32(PAD, 2))]
  jobs += [lambda n=n: _index_insert.lower(st.index, u32(n, 2), i32(n))
           for n in PRECOMPILED_INSERTS]
  if attach is not None:
    rows, width = attach
    attach_ = _attach_l1_donated if donate else _attach_l1
    jobs.append(lambda: attach_.lower(st, i32(rows), i32(rows, width), i32(rows), None,
                                      config=config))

  def run():
    for job in jobs:
      try:
        job().compile()
      except Exception as err:  # noqa: BLE001: a warm-up; the real call compiles anyway
        log.warning("tiers.precompile: %s", err)
  thread = threading.Thread(target=run, name="kvjax-tiers-precompile", daemon=True)
  thread.start()
  return thread


def pad_hashes(h: np.ndarray) -> jax.Array:
  """uint32 [N', 2]: ``h`` ([N, 2]) padded with zeros to the next power of two >= PAD."""
  n = pow2_at_least(len(h), PAD)
  out = np.zeros((n, 2), np.uint32)
  out[:len(h)] = h
  return jax.device_put(out)


def plan_step(ts: TieredState, seq_ids, tokens, num_tokens, seeds=None, *,
              config: CacheConfig, tiers: TierConfig, return_plan: bool = False):
  """``kvjax.cache.plan_step`` on L1 after ``sync`` (so its evictions are demotions).

  Returns the new state, or ``(plan, state)`` with ``return_plan``.
  """
  ts = sync(ts, config=config, tiers=tiers)
  plan, l1 = _plan_l1(ts.l1, seq_ids, tokens, num_tokens, seeds, config=config)
  ts = revalidate(ts.replace(l1=l1), config=config)
  return (plan, ts) if return_plan else ts


def release(ts: TieredState, seq_ids, *, config: CacheConfig) -> TieredState:
  """``kvjax.cache.release`` on L1 (its full pages stay cached, and copied at the next sync)."""
  return ts.replace(l1=_release_l1(ts.l1, seq_ids, config=config))


def fork(ts: TieredState, src_ids, dst_ids, *, config: CacheConfig) -> TieredState:
  """``kvjax.cache.fork`` on L1."""
  return ts.replace(l1=_fork_l1(ts.l1, src_ids, dst_ids, config=config))


def relieve(ts: TieredState, *, config: CacheConfig, tiers: TierConfig, **kwargs):
  """Pressure across tiers: ``kvjax.pressure.relieve`` on L1 after ``sync`` (so its
  evictions are demotions), then ``relieve_l2`` (L2's own levels, to L3 when attached).

  ``kwargs`` go to L1's ``relieve`` (``pressure``, ``demote_to``, ...). Returns
  ``(relief, state)``: L1's ``Relief``; L2's evictions are counted in ``stats``.
  """
  ts = sync(ts, config=config, tiers=tiers)
  relief, l1 = _relieve_l1(ts.l1, config=config, **kwargs)
  _, ts = relieve_l2(ts.replace(l1=l1), config=config, tiers=tiers)
  return relief, ts


def l2_victims(m2: dict, copy: np.ndarray, n: int) -> np.ndarray:
  """int [<= n]: the L2 pages ``relieve_l2`` evicts, coldest first.

  Orphans (pages whose L2 parent was evicted: they can never match again) go first,
  then pages that are no L1 page's copy, then copies (an evicted copy would be written
  again at the next ``sync``); each group by last access, deepest block first at equal
  stamps (children before their parents), then by page id.
  """
  held = np.flatnonzero(m2["filled"] > 0)
  group = np.where(m2["parent"][held] == -2, 0, 1 + np.isin(held, copy[copy >= 0]))
  age = m2["last_access"][held].astype(np.int64) * _POS - m2["position"][held]
  order = np.lexsort((held, age, group))
  return held[order[:n]]


def relieve_l2(ts: TieredState, *, config: CacheConfig, tiers: TierConfig):
  """Evict L2 ahead of need by its pressure level (``tiers.l2_pressure``: 60 / 80 / 90 %).

  At ``medium`` and above, the coldest L2 pages (``l2_victims``) are evicted in batches
  until occupancy is back at the level's target; with an L3 tier attached they are
  demoted to it (its write policy permitting), as ``sync``'s own evictions are. The
  next ``sync`` then finds free L2 pages instead of evicting one page at a time.
  L2 holds one spec, so no page is requantized here.

  Returns ``(level, state)``: L2's level before the relief (0 low .. 3 critical).

  >>> import jax.numpy as jnp
  >>> import kvjax
  >>> from kvjax.tiers.state import init
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=8, max_seqs=1, max_pages_per_seq=4)
  >>> tc = TierConfig(l2_pages=4, batch=1)
  >>> ts = plan_step(init(cfg, tc), jnp.array([0]), jnp.array([[1, 2, 3, 4, 5, 6, 7]]),
  ...                jnp.array([7]), config=cfg, tiers=tc)
  >>> ts = sync(ts, config=cfg, tiers=tc)        # 3 of 4 L2 pages: 75 %, medium
  >>> lv, ts = relieve_l2(ts, config=cfg, tiers=tc)
  >>> int(lv), int((ts.l2.meta.filled > 0).sum())  # down to 55 %: 2 pages
  (1, 2)
  """
  m2 = host_meta(ts.l2.meta)
  occupied = int((m2["filled"] > 0).sum())
  pc = tiers.l2_pressure
  with jax.ensure_compile_time_eval():
    lv = int(pressure_level(occupied, tiers.l2_pages, pc))
    n = int(evict_ahead(occupied, tiers.l2_pages, pc))
  if n == 0:
    return lv, ts
  copy = np.array(ts.l1_copy)
  gone = []
  for q in l2_victims(m2, copy, n):
    if ts.l3 is not None:
      gone.append(ts.l3.record(m2, int(q)))
    evict_l2(m2, copy, int(q))
  if ts.l3 is not None:   # the evicted pages' data is still in ts.l2
    ts = ts.l3.demote(ts, gone)
  ts = ts.replace(l2=ts.l2.replace(meta=device_meta(m2, ts.l2.meta)),
                  l1_copy=put_like(copy, ts.l1_copy))
  return lv, add_stats(ts, l2_evictions=n)


def swap_out(ts: TieredState, seq_id: int, *, config: CacheConfig, tiers: TierConfig):
  """Swap a live sequence out: its full pages are copied to L2 (``sync``), its slot is freed.

  Returns ``(handle, state)``: ``handle`` is ``(tokens int32 [n], seed uint32 [2])``, the
  sequence's cached tokens and chain seed; ``swap_in`` resumes it.
  """
  ts = sync(ts, config=config, tiers=tiers)
  n = int(ts.l1.seq_lens[seq_id])
  row = np.asarray(ts.l1.page_table[seq_id])
  meta_tokens = np.asarray(ts.l1.meta.tokens)
  s = config.page_size
  toks = np.concatenate([meta_tokens[row[j]] for j in range(-(-n // s))]) if n else np.zeros(0)
  handle = (toks[:n].astype(np.int32), np.asarray(ts.l1.seq_seed[seq_id]))
  ts = release(ts, jax.device_put(np.array([seq_id], np.int32)), config=config)
  return handle, add_stats(ts, swaps_out=1)


def swap_in(ts: TieredState, seq_id: int, handle, *, config: CacheConfig, tiers: TierConfig):
  """Resume a swapped-out sequence in empty slot ``seq_id`` from L1/L2.

  Returns ``(cached, state)``: its first ``cached`` tokens are attached again;
  the caller recomputes the rest (``plan_step`` + the model) as for a prompt.
  The tokens are padded to a power of two >= ``PAD`` (L1's jitted attach compiles
  once per width, not once per sequence length).
  """
  toks, seed = handle
  seeds = None if not np.any(seed) else jax.device_put(np.asarray(seed[None], np.uint32))
  width = pow2_at_least(len(toks), PAD)
  padded = np.zeros((1, width), np.int32)
  padded[0, :len(toks)] = toks
  cached, ts = attach_prefix(ts, jax.device_put(np.array([seq_id], np.int32)),
                             jax.device_put(padded), jax.device_put(np.array([len(toks)], np.int32)),
                             seeds, config=config, tiers=tiers)
  return int(cached[0]), add_stats(ts, swaps_in=1)
