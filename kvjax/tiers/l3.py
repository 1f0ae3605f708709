"""The L3 tier under L2: L2's evicted pages go to a ``BlockStore``, and a prompt's chain
continues there when L1 and L2 run out (read, verified, promoted into L2 and L1).

``with_l3(ts, L3Tier(store, config=..., tiers=...))`` puts the host-side tier into a
``TieredState``; the tiered operations (``kvjax.tiers.ops``) then call it at four
points: an L2 eviction (``record`` + ``demote``), new L2 pages (``inserted``: write
through), the end of a row's L1/L2 match (``continue_chain``) and the pages an attach
served (``served``: hit counts for selective write-through, exact L1 copies).

* **Format.** A page is stored in the L3 preset's specs (default ``"int4"`` as in the
  seed; ``"bf16"`` for a bit-exact round trip over an unquantized L2), requantized from
  the tier it leaves (``kvjax.tiers.move.recode``), plus a ``structure`` field (uint32
  [4]: position, a 64-bit prefix digest, 0) inside the checksummed page.
* **Keys and structure.** A page is keyed by its chained block hash; its record holds
  its tokens, namespace (the chain seed) and parent's block hash, and the digest is a
  BLAKE2b chain over the seed and every token up to the block, computed on the host
  independently of ``CacheConfig.hash_fn``. A page read back serves block ``j`` of a
  prompt only if the store's checksums hold and its tokens, position ``j``, namespace,
  parent hash and digest all match the prompt's: a colliding ``hash_fn`` can shorten a
  match (one page per key), never hand out another tenant's or prefix's page.
* **Write policy** (``kvjax.store.WritePolicy``): ``write_back`` (default) writes a page
  when L2 evicts it; ``write_through`` when it enters L2 (from L1, exact); and
  ``write_through_selective(N)`` once attaches have served it ``N`` times.
* **Promotion.** The verified run goes into L2 pages (free first, then L2's least
  recently used ones that are not L2 copies of L1 pages nor wanted by this attach;
  they are demoted in turn), then L1's promotion (``kvjax.tiers.ops.promote``) serves
  it. When L2's spec is lossy and differs from L3's, the L1 pages are rewritten from
  the L3 data directly after the attach, so L1 holds L3's decode, not L2's re-encoding.
* **Prefetch**: ``prefetch`` issues the L3 reads of a queued request's prefix (the
  blocks after those L1 and L2 hold, while the store lists them) to a
  ``kvjax.store.Prefetcher``; ``continue_chain`` takes them under
  ``L3Config.prefetch`` (``best_effort`` / ``wait_complete`` / ``timeout``) and reads the
  rest itself.

Names in shapes: L = num_layers, P2 = L2 pages, S = page_size, n = pages.

>>> L3Config().preset, L3Config().write.mode
('int4', 'write_back')
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.cache.state import default_seed
from kvjax.layout.pages import Pages
from kvjax.layout.presets import PRESETS
from kvjax.prefix.hashing import chain_hashes
from kvjax.prefix.index import index_lookup
from kvjax.store import BlockStore
from kvjax.store import Field
from kvjax.store import PageFormat
from kvjax.store import PageInfo
from kvjax.store import Prefetcher
from kvjax.store import PrefetchPolicy
from kvjax.store import StoreWriteError
from kvjax.store import WritePolicy
from kvjax.tiers.config import TierConfig
from kvjax.tiers.move import move_into
from kvjax.tiers.move import pad_ids
from kvjax.tiers.move import recode
from kvjax.tiers.move import take_pages
from kvjax.tiers.ops import add_stats
from kvjax.tiers.ops import evict_l2
from kvjax.tiers.state import TieredState

log = logging.getLogger(__name__)

STRUCTURE = "structure"   # the page field holding (position, digest lane 0, lane 1, 0)


@dataclasses.dataclass(frozen=True)
class L3Config:
  """How the L3 tier stores, writes and prefetches.

  Args:
    preset: a ``kvjax.layout.PRESETS`` name for L3's (key, value) specs (no residual
      window, no sink); "int4" by default, "bf16" for bit-exact pages.
    write: the ``WritePolicy`` (default ``write_back``: L2's evictions go down).
    prefetch: the ``PrefetchPolicy`` for pages a ``Prefetcher`` read ahead.
  """

  preset: str = "int4"
  write: WritePolicy = WritePolicy("write_back")
  prefetch: PrefetchPolicy = PrefetchPolicy("best_effort")

  def __post_init__(self):
    if self.preset not in PRESETS:
      raise ValueError(f"L3Config.preset must be one of {sorted(PRESETS)}, got "
                       f"{self.preset!r}")
    k, v = PRESETS[self.preset]
    if k.residual or v.residual or k.sink or v.sink:
      raise ValueError(f"L3Config.preset {self.preset!r}: L3 stores whole pages, no residual "
                       "window or sink")
    if not isinstance(self.write, WritePolicy):
      raise ValueError(f"L3Config.write must be a WritePolicy, got {self.write!r}")
    if not isinstance(self.prefetch, PrefetchPolicy):
      raise ValueError(f"L3Config.prefetch must be a PrefetchPolicy, got {self.prefetch!r}")


def l3_format(config: CacheConfig, preset: str = "int4") -> PageFormat:
  """The store's ``PageFormat`` for ``config``'s pages in ``preset``, plus ``structure``.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                         num_pages=4, max_seqs=1, max_pages_per_seq=2)
  >>> [f.name for f in l3_format(cfg, "bf16").fields]
  ['k_data', 'v_data', 'structure']
  """
  k, v = PRESETS[preset]
  base = PageFormat.for_specs(k, v, num_layers=config.num_layers, page_size=config.page_size,
                              num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                              dtype=config.dtype)
  return dataclasses.replace(base, fields=base.fields + (Field(STRUCTURE, (4,), "uint32"),))


def digest(parent: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """uint32 [2]: the prefix digest of a block (BLAKE2b of the parent digest or seed, tokens).

  >>> d = digest(np.array([1, 2], np.uint32), np.array([5, 6]))
  >>> d.dtype, bool(np.all(d == digest(np.array([1, 2], np.uint32), np.array([5, 6]))))
  (dtype('uint32'), True)
  """
  h = hashlib.blake2b(np.asarray(parent, "<u4").tobytes(), digest_size=8)
  h.update(np.asarray(tokens, "<i4").tobytes())
  return np.frombuffer(h.digest(), "<u4").astype(np.uint32)


def digests(seed, tokens: np.ndarray, blocks: int, page_size: int) -> np.ndarray:
  """uint32 [blocks, 2]: ``digest`` chained over the first ``blocks`` blocks of ``tokens``."""
  out = np.zeros((blocks, 2), np.uint32)
  prev = np.asarray(seed, np.uint32)
  for j in range(blocks):
    prev = out[j] = digest(prev, tokens[j * page_size:(j + 1) * page_size])
  return out


@functools.partial(jax.jit, static_argnames=("kspec", "vspec"))
def recode_ids(k: Pages, v: Pages, ids: jax.Array, kspec, vspec) -> tuple[Pages, Pages]:
  """Pages ``ids`` (int32 [n]) of pools ``k``, ``v`` re-encoded into ``kspec``/``vspec``."""
  return recode(take_pages(k, ids), kspec), recode(take_pages(v, ids), vspec)


def batch_pages(arrays: dict, spec, side: str, n_pad: int) -> Pages:
  """``Pages`` [L, n_pad, ...] in ``spec`` from the store's arrays ({field: [n, L, ...]})."""
  def field(name):
    a = arrays.get(f"{side}_{name}")
    if a is None:
      return None
    pad = np.zeros((n_pad - a.shape[0],) + a.shape[1:], a.dtype)
    return jax.device_put(np.moveaxis(np.concatenate([a, pad]), 0, 1))
  return Pages(data=field("data"), scale=field("scale"), zero=field("zero"), spec=spec)


def with_l3(ts: TieredState, tier: Optional["L3Tier"]) -> TieredState:
  """``ts`` with the L3 tier ``tier`` under its L2 (None: none)."""
  if tier is not None and not isinstance(tier, L3Tier):
    raise ValueError(f"with_l3: tier must be an L3Tier or None, got {type(tier).__name__}")
  if tier is not None and tier.tiers.l2_pages != ts.l2.meta.filled.shape[0]:
    raise ValueError(f"with_l3: the tier was built for {tier.tiers.l2_pages} L2 pages, the "
                     f"state has {ts.l2.meta.filled.shape[0]}")
  return ts.replace(l3=tier)


class L3Tier:
  """The host side of L3: a ``BlockStore`` of pages in ``l3.preset`` and its bookkeeping.

  Args:
    store: a ``BlockStore`` created with ``l3_format(config, l3.preset)`` (a store
      reopened on its directory keeps its pages: a warm restart).
    config: the L1 ``CacheConfig``; tiers: the ``TierConfig``; l3: the ``L3Config``.
    prefetcher: an optional ``Prefetcher`` over ``store`` (``prefetch`` issues to it).

  Per L2 page it keeps what the store needs when the page leaves L2 and its L2 parent
  may be gone: ``digest2`` uint32 [P2, 2], ``parent2`` uint32 [P2, 2] (the parent's
  block hash, 0 at a start) and ``guard2`` uint32 [P2, 2] (the block hash they belong
  to; a page whose hash differs, e.g. one written by a path without the hook, is not
  demoted).
  """

  def __init__(self, store: BlockStore, *, config: CacheConfig, tiers: TierConfig,
               l3: L3Config = L3Config(), prefetcher: Optional[Prefetcher] = None):
    if not isinstance(store, BlockStore):
      raise ValueError(f"L3Tier: store must be a BlockStore, got {type(store).__name__}")
    want = l3_format(config, l3.preset)
    if store.format != want:
      raise ValueError(f"L3Tier: the store's format {store.format} is not l3_format(config, "
                       f"{l3.preset!r}) = {want}")
    if prefetcher is not None and prefetcher.store is not store:
      raise ValueError("L3Tier: prefetcher must read from the same store")
    self.store, self.config, self.tiers, self.l3 = store, config, tiers, l3
    self.prefetcher = prefetcher
    self.kspec, self.vspec = PRESETS[l3.preset]
    p2 = tiers.l2_pages
    self.digest2 = np.zeros((p2, 2), np.uint32)   # uint32 [P2, 2]
    self.parent2 = np.zeros((p2, 2), np.uint32)   # uint32 [P2, 2]
    self.guard2 = np.zeros((p2, 2), np.uint32)    # uint32 [P2, 2]
    self.hits: dict = {}  # {block key: attaches that served it} (selective policy only)
    self.staged: list = []                        # [(k Pages, v Pages, {L2 page: row})]
    l2k, _ = PRESETS[tiers.l2_preset]
    self.exact_fixup = l2k.is_quantized and PRESETS[tiers.l2_preset] != PRESETS[l3.preset]

  # ------------------------------------------------------------------ writing

  def record(self, m2: dict, q: int) -> Optional[dict]:
    """What the store needs of L2 page ``q`` (about to be evicted), or None if unknown."""
    key = m2["block_hash"][q].copy()
    ok = (m2["filled"][q] == self.config.page_size and np.any(key != 0)
          and np.array_equal(self.guard2[q], key))
    self.guard2[q] = 0
    if not ok:
      return None
    return {"page": int(q), "hash": key, "tokens": m2["tokens"][q].copy(),
            "namespace": m2["namespace"][q].copy(), "parent": self.parent2[q].copy(),
            "position": int(m2["position"][q]), "digest": self.digest2[q].copy()}

  def put(self, ts: TieredState, k: Pages, v: Pages, ids, recs: list) -> TieredState:
    """Write pages ``ids`` of pools ``k``, ``v`` (any spec) with records ``recs`` to L3."""
    if not recs:
      return ts
    ids = pad_ids(ids, 0)
    k3, v3 = recode_ids(k, v, ids, kspec=self.kspec, vspec=self.vspec)
    n = len(recs)
    arrays = {}
    for side, pages in (("k", k3), ("v", v3)):
      for f in ("data", "scale", "zero"):
        a = getattr(pages, f)
        if a is not None:
          arrays[f"{side}_{f}"] = np.moveaxis(np.asarray(a)[:, :n], 1, 0)
    arrays[STRUCTURE] = np.array([[r["position"], r["digest"][0], r["digest"][1], 0]
                                  for r in recs], np.uint32)
    info = PageInfo(np.stack([r["tokens"] for r in recs]).astype(np.int32),
                    np.stack([r["parent"] for r in recs]).astype(np.uint32),
                    np.stack([r["namespace"] for r in recs]).astype(np.uint32))
    hashes = np.stack([r["hash"] for r in recs]).astype(np.uint32)
    before = self.store.stats()["writes"]
    errors = 0
    try:
      self.store.put(hashes, arrays, info)
    except StoreWriteError as err:   # raised once by the store (writes are off after it):
      errors = 1                     # said once here; L1 and L2 keep serving
      log.error("%s; L1 and L2 keep serving, L3 serves what it holds", err)
    written = self.store.stats()["writes"] - before
    return add_stats(ts, l3_demotions=written, l3_write_errors=errors,
                     l3_bytes_demoted=written * self.store.format.page_bytes)

  def demote(self, ts: TieredState, gone: list) -> TieredState:
    """L2's evicted pages (``record``s; their data still in ``ts.l2``) to L3, per policy."""
    recs = [r for r in gone if r is not None]
    if not recs or not self.l3.write.wants("evict"):
      return ts
    return self.put(ts, ts.l2.k, ts.l2.v, [r["page"] for r in recs], recs)

  def inserted(self, ts: TieredState, m2: dict, src, dst) -> TieredState:
    """New L2 pages ``dst`` (copies of L1 pages ``src``, in chain order): their digests,
    and a write to L3 under ``write_through`` (from L1, exact)."""
    recs = []
    s = self.config.page_size
    for p, q in zip(src, dst):
      par = int(m2["parent"][q])
      if par == -1 and m2["position"][q] == 0:
        parent, prev = np.zeros(2, np.uint32), m2["namespace"][q]
      elif par >= 0 and np.array_equal(self.guard2[par], m2["block_hash"][par]):
        parent, prev = m2["block_hash"][par], self.digest2[par]
      else:
        self.guard2[q] = 0
        continue
      self.digest2[q] = digest(prev, m2["tokens"][q])
      self.parent2[q] = parent
      self.guard2[q] = m2["block_hash"][q]
      if self.l3.write.wants("insert") and m2["filled"][q] == s:
        rec = self.record(m2, q)
        self.guard2[q] = m2["block_hash"][q]   # record() clears it; the page stays in L2
        rec["page"] = int(p)
        recs.append(rec)
    return self.put(ts, ts.l1.k, ts.l1.v, [r["page"] for r in recs], recs)

  # ------------------------------------------------------------------ reading

  def row_hashes(self, seed, tokens: np.ndarray, blocks: int) -> np.ndarray:
    """uint32 [blocks, 2]: the chained block hashes of a prompt row (as L1 computes them)."""
    s = self.config.page_size
    t = np.zeros((-(-len(tokens) // s) * s,), np.int32)
    t[:len(tokens)] = tokens
    h = chain_hashes(jax.device_put(np.asarray(seed, np.uint32)), jax.device_put(t), page_size=s,
                     hash_fn=self.config.block_hash_fn)
    return np.asarray(h)[:blocks].astype(np.uint32)

  def read(self, hashes: np.ndarray):
    """``StoreRead`` of ``hashes``: the prefetcher's pages first, the rest from the store."""
    if self.prefetcher is None:
      return self.store.get(hashes)
    took = self.prefetcher.take(hashes, self.l3.prefetch)
    rest = np.flatnonzero(~took.found)
    if len(rest):
      r = self.store.get(hashes[rest])
      took.found[rest] = r.found
      for f in took.arrays:
        took.arrays[f][rest] = r.arrays[f]
      for dst, src_ in zip(took.info, r.info):
        dst[rest] = src_
    return took

  def continue_chain(self, ts: TieredState, m2: dict, copy: np.ndarray, wanted: list,
                     protect: set, *, row: int,
                     tokens: np.ndarray, seed, start: int, blocks: int, prev1: int,
                     prev2: int, donate: bool = False) -> TieredState:
    """Continue row ``row``'s chain in L3 from block ``start`` (L1 and L2 ran out there).

    Reads the blocks the store lists (one batch), verifies each in order (checksums,
    tokens, position, namespace, parent hash, digest), puts the verified run into L2
    pages (``m2`` and the attach's ``copy``, int [P1], updated in place; data into
    ``ts.l2``) and appends them to ``wanted`` for L1's promotion. ``prev1``/``prev2``:
    the L1/L2 page of block ``start - 1`` (-1 if none). ``donate``: L2's pools are
    updated in place (``tiers.attach_prefix``'s ``donate``).
    """
    s = self.config.page_size
    seed = np.asarray(seed, np.uint32)
    hashes = self.row_hashes(seed, tokens, blocks)
    want = hashes[start:]
    ts = add_stats(ts, l3_lookups_pages=len(want))
    listed = self.store.contains(want)
    n = int(np.argmin(listed)) if not listed.all() else len(want)
    # L2 pages this run may take: free ones, then the least recently used of those not
    # in this attach's chains (the copies of matched L1 pages, the pages wanted), pages
    # that copy no L1 page first
    keep = {int(copy[p]) for p in protect} | {q for _, _, q, _ in wanted} | {int(prev2)}
    free = np.flatnonzero(m2["filled"] == 0)
    taken = np.zeros(len(m2["filled"]), bool)
    taken[[q for q in keep if q >= 0]] = True
    taken[free] = True
    lru = np.flatnonzero(~taken)
    mirror = np.zeros(len(m2["filled"]), bool)
    mirror[copy[copy >= 0]] = True
    lru = lru[np.lexsort((m2["last_access"][lru], mirror[lru]))]
    n = min(n, len(free) + len(lru), self.config.num_pages)
    if n == 0:
      return ts
    stats0 = self.store.stats()
    got = self.read(want[:n])
    stats1 = self.store.stats()
    bad_reads = (stats1["checksum_failures"] - stats0["checksum_failures"]
                 + stats1["missing_files"] - stats0["missing_files"])
    digs = digests(seed, tokens, start + n, s)
    m = 0
    verify_failed = 0
    for i in range(n):
      j = start + i
      if not got.found[i]:
        break
      st = got.arrays[STRUCTURE][i]
      parent = hashes[j - 1] if j > 0 else np.zeros(2, np.uint32)
      ok = (np.array_equal(got.info.tokens[i], tokens[j * s:(j + 1) * s])
            and np.array_equal(got.info.namespace[i], seed)
            and np.array_equal(got.info.parent[i], parent)
            and int(st[0]) == j and np.array_equal(st[1:3], digs[j]))
      if not ok:
        verify_failed = 1
        break
      m += 1
    ts = add_stats(ts, l3_checksum_failures=bad_reads, l3_verify_failures=verify_failed)
    if m == 0:
      return ts
    # L2 pages: free first, then the least recently used (demoted to L3 in turn)
    pages = list(free[:m])
    if len(pages) < m:
      victims = [int(q) for q in lru[:m - len(pages)]]
      gone = []
      for q in victims:
        gone.append(self.record(m2, q))
      ts = self.demote(ts, gone)
      for q in victims:
        evict_l2(m2, copy, q)
      ts = add_stats(ts.replace(l1_copy=jax.device_put(copy)), l2_evictions=len(victims))
      pages += victims
    clock = int(ts.l1.clock)
    par2 = prev2 if start > 0 else -1
    if start > 0 and par2 < 0:
      par2 = -2                       # no L2 parent: orphaned in L2, served to L1 now
    rows = {}
    for i, q in enumerate(pages):
      q = int(q)
      j = start + i
      m2["block_hash"][q] = hashes[j]
      m2["tokens"][q] = tokens[j * s:(j + 1) * s]
      m2["position"][q] = j
      m2["filled"][q] = s
      m2["namespace"][q] = seed
      m2["parent"][q] = par2
      m2["ref_count"][q] = 0
      m2["last_access"][q] = clock
      m2["access_count"][q] = 1
      self.digest2[q] = digs[j]
      self.parent2[q] = hashes[j - 1] if j > 0 else 0
      self.guard2[q] = hashes[j]
      par2 = q
      first = len(wanted) == 0 or wanted[-1][0] != row
      wanted.append((row, j, q, prev1 if first else None))
      rows[q] = i
    n_pad = int(pad_ids(np.arange(m), 0).shape[0])
    arrays = {f: a[:m] for f, a in got.arrays.items() if f != STRUCTURE}
    k3 = batch_pages(arrays, self.kspec, "k", n_pad)
    v3 = batch_pages(arrays, self.vspec, "v", n_pad)
    k, v = move_into(k3, v3, ts.l2.k, ts.l2.v, pad_ids(np.arange(m), 0),
                     pad_ids(pages, self.tiers.l2_pages), donate=donate)
    if self.exact_fixup:
      self.staged.append((k3, v3, rows))
    ts = ts.replace(l2=ts.l2.replace(k=k, v=v))
    return add_stats(ts, l3_promotions=m, l3_bytes_promoted=m * self.store.format.page_bytes)

  def served(self, ts: TieredState, ids, toks, served, seed_rows, default, *,
             config: CacheConfig, donate: bool = False) -> TieredState:
    """After an attach: L1 pages promoted from L3 get L3's own decode (``exact_fixup``);
    served blocks' hit counts advance, and ``write_through_selective`` writes those that
    reach its count (from L1, exact). ``donate``: L1's pools are updated in place."""
    l1 = ts.l1
    if self.staged:
      copy = np.asarray(ts.l1_copy)
      k, v = l1.k, l1.v
      for k3, v3, rows in self.staged:
        src, dst = [], []
        for p in np.flatnonzero(copy >= 0):
          if int(copy[p]) in rows:
            src.append(rows[int(copy[p])])
            dst.append(int(p))
        if src:
          k, v = move_into(k3, v3, k, v, pad_ids(src, 0), pad_ids(dst, config.num_pages),
                           donate=donate)
      self.staged = []
      ts = ts.replace(l1=l1.replace(k=k, v=v))
    pol = self.l3.write
    if pol.mode != "write_through_selective":
      return ts
    s = config.page_size
    table = np.asarray(ts.l1.page_table)
    meta_hash = np.asarray(ts.l1.meta.block_hash)
    recs = []
    for r, sid in enumerate(np.asarray(ids).reshape(-1)):
      n = int(served[r])
      if n <= 0:
        continue
      seed = seed_rows[r] if np.any(seed_rows[r] != 0) else default
      digs = None
      for j in range(n):
        p = int(table[sid, j])
        key = meta_hash[p]
        kk = (int(key[0]) << 32) | int(key[1])
        self.hits[kk] = self.hits.get(kk, 0) + 1
        if pol.wants("hit", self.hits[kk]) and not self.store.contains(key[None])[0]:
          if digs is None:
            digs = digests(seed, toks[r], n, s)
          recs.append({"page": p, "hash": key.copy(), "tokens": toks[r, j * s:(j + 1) * s],
                       "namespace": np.asarray(seed, np.uint32),
                       "parent": meta_hash[int(table[sid, j - 1])] if j else
                       np.zeros(2, np.uint32), "position": j, "digest": digs[j]})
    return self.put(ts, ts.l1.k, ts.l1.v, [r["page"] for r in recs], recs)

  # ------------------------------------------------------------------ prefetch

  def prefetch(self, ts: TieredState, tokens, num_tokens, seeds=None) -> int:
    """Issue the L3 reads of queued prompts' prefixes; pages issued.

    Args: as ``attach_prefix``'s (``tokens`` int [B, T], ``num_tokens`` int [B],
    ``seeds`` uint32 [B, 2] / [2] / None). Per row, the blocks after the longest run
    whose hashes L1's index or L2 hold, up to the first block the store does not list.
    """
    if self.prefetcher is None:
      raise ValueError("L3Tier.prefetch: the tier has no prefetcher")
    toks = np.asarray(tokens)
    nt = np.asarray(num_tokens).reshape(-1)
    b = toks.shape[0]
    seeds = np.zeros((b, 2), np.uint32) if seeds is None else np.broadcast_to(
        np.asarray(seeds, np.uint32), (b, 2))
    default = np.asarray(default_seed(self.config), np.uint32)
    s = self.config.page_size
    l2_keys = np.asarray(ts.l2.meta.block_hash)
    l2_keys = set(((l2_keys[:, 0].astype(np.uint64) << np.uint64(32))
                   | l2_keys[:, 1].astype(np.uint64)).tolist())
    issued = 0
    for r in range(b):
      blocks = max(int(nt[r]) - 1, 0) // s
      if blocks == 0:
        continue
      seed = seeds[r] if np.any(seeds[r] != 0) else default
      h = self.row_hashes(seed, toks[r], blocks)
      in_l1 = np.asarray(index_lookup(ts.l1.index, jax.device_put(h))) >= 0
      keys = (h[:, 0].astype(np.uint64) << np.uint64(32)) | h[:, 1].astype(np.uint64)
      above = in_l1 | np.array([k in l2_keys for k in keys.tolist()])
      start = int(np.argmin(above)) if not above.all() else blocks
      rest = h[start:]
      if not len(rest):
        continue
      listed = self.store.contains(rest)
      n = int(np.argmin(listed)) if not listed.all() else len(rest)
      if n:
        issued += self.prefetcher.issue(rest[:n])
    return issued

  def close(self) -> None:
    """Stop the prefetcher (if any) and close the store (its index snapshotted)."""
    if self.prefetcher is not None:
      self.prefetcher.close()
    self.store.close()
