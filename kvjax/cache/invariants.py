"""``check_invariants``: the cache's bookkeeping, verified on the host.

What every operation (``plan_step``, ``write``, ``attach_prefix``, ``release``,
``fork``, ``relieve``, page dropping) must preserve, checked from the arrays
alone with numpy (no traced code, so it never changes what it checks):

* **references**: a page's ``ref_count`` is the number of live sequence
  columns that name it; a sequence names exactly ``ceil(seq_lens / S)`` pages,
  the rest of its row is -1;
* **free pages**: a page with no reference and no hash is empty (``filled == 0``);
* **index and hashes**: the prefix index maps each hashed page's hash to that
  page, every live entry names a page holding that hash, no page twice;
* **hash chains and the orphan rule**: a hashed page is full; its hash is the
  block hash of its tokens onto its parent's hash (its namespace seed for a
  first block); a page whose parent was reused (``parent == ORPHAN``) is never
  hashed;
* **namespaces**: every page a live sequence holds carries that sequence's
  namespace seed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.cache.pool import ORPHAN
from kvjax.cache.state import CacheState
from kvjax.prefix.hashing import remap_no_hash


class InvariantError(AssertionError):
  """The cache's bookkeeping is inconsistent; ``violations`` lists what, one line each."""

  def __init__(self, violations: list[str]):
    super().__init__(f"{len(violations)} cache invariant(s) violated:\n" + "\n".join(violations))
    self.violations = list(violations)


def invariant_violations(state: CacheState, config: CacheConfig,
                         limit: Optional[int] = 20) -> list[str]:
  """What of ``check_invariants`` fails for ``state``: one line per violation (at most
  ``limit`` of each kind; None = all). Empty when the state is consistent.

  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> st = kvjax.init(cfg)
  >>> invariant_violations(st, cfg)
  []
  >>> invariant_violations(st.replace(meta=st.meta.replace(ref_count=st.meta.ref_count.at[3].set(1))),
  ...                      cfg)
  ['page 3: ref_count 1 but 0 live sequence columns name it']
  """
  g = jax.device_get
  s_, p_ = config.page_size, config.num_pages
  table = np.asarray(g(state.page_table))
  lens = np.asarray(g(state.seq_lens))
  seq_seed = np.asarray(g(state.seq_seed))
  ref = np.asarray(g(state.meta.ref_count))
  filled = np.asarray(g(state.meta.filled))
  parent = np.asarray(g(state.meta.parent))
  position = np.asarray(g(state.meta.position))
  block_hash = np.asarray(g(state.meta.block_hash))
  namespace = np.asarray(g(state.meta.namespace))
  keys = np.asarray(g(state.index.keys))
  values = np.asarray(g(state.index.values))
  out: dict[str, list[str]] = {}

  def bad(kind: str, msg: str) -> None:
    out.setdefault(kind, []).append(msg)

  # References and page tables.
  count = np.zeros(p_, np.int64)
  for slot in range(table.shape[0]):
    n = -(-int(lens[slot]) // s_)
    if lens[slot] < 0 or n > table.shape[1]:
      bad("table", f"seq {slot}: seq_lens {lens[slot]} outside [0, {config.max_seq_len}]")
      continue
    used, rest = table[slot, :n], table[slot, n:]
    if (used < 0).any() or (used >= p_).any():
      bad("table", f"seq {slot}: columns {np.flatnonzero((used < 0) | (used >= p_)).tolist()} "
                   f"of its {n} pages name no page")
    if (rest != -1).any():
      bad("table", f"seq {slot}: columns past its {n} pages are not -1: {rest.tolist()}")
    ok = used[(used >= 0) & (used < p_)]
    np.add.at(count, ok, 1)
    if n and not seq_seed[slot].any():
      bad("namespace", f"seq {slot}: {lens[slot]} tokens but no namespace seed")
    elif n:
      foreign = ok[(namespace[ok] != seq_seed[slot]).any(axis=1)]
      if foreign.size:
        bad("namespace", f"seq {slot}: pages {foreign.tolist()} carry another namespace")
    full = ok[:int(lens[slot]) // s_]
    short = full[filled[full] != s_]
    if short.size:
      bad("fill", f"seq {slot}: full pages {short.tolist()} have filled != {s_}")
  for p in np.flatnonzero(count != ref):
    bad("ref", f"page {p}: ref_count {ref[p]} but {count[p]} live sequence columns name it")

  hashed = block_hash.any(axis=1)
  for p in np.flatnonzero((ref == 0) & ~hashed & (filled != 0)):
    bad("free", f"page {p}: no reference and no hash but filled {filled[p]}")

  # Index <-> hashes.
  live = values >= 0
  pages = values[live]
  if (pages >= p_).any():
    bad("index", f"index entries name pages past the pool: {pages[pages >= p_].tolist()}")
  in_pool = pages < p_
  pages_ok = pages[in_pool]
  mism = np.flatnonzero(live)[in_pool][(block_hash[pages_ok] != keys[live][in_pool]).any(axis=1)]
  for slot in mism:
    bad("index", f"index slot {slot}: key {keys[slot].tolist()} names page {values[slot]}, "
                 f"whose hash is {block_hash[values[slot]].tolist()}")
  uniq, times = np.unique(pages_ok, return_counts=True)
  if (times > 1).any():
    bad("index", f"pages indexed more than once: {uniq[times > 1].tolist()}")
  missing = np.setdiff1d(np.flatnonzero(hashed), pages_ok)
  if missing.size:
    bad("index", f"hashed pages missing from the index: {missing.tolist()}")

  # Hash chains and the orphan rule.
  for p in np.flatnonzero((parent == ORPHAN) & hashed):
    bad("orphan", f"page {p}: orphaned (parent {ORPHAN}) but still hashed")
  for p in np.flatnonzero(hashed & (filled != s_)):
    bad("chain", f"page {p}: hashed but filled {filled[p]} of {s_}")
  idx = np.flatnonzero(hashed)
  if idx.size:
    first = parent[idx] == -1
    par = np.clip(parent[idx], 0, p_ - 1)
    for p in idx[~first & ((parent[idx] < 0) | ~hashed[par])]:
      bad("chain", f"page {p}: hashed, but its parent {parent[p]} holds no hash")
    for p in idx[first & (position[idx] != 0)]:
      bad("chain", f"page {p}: hashed with no parent at block position {position[p]}")
    chain_from = np.where(first[:, None], namespace[idx], block_hash[par])
    tokens = np.asarray(g(state.meta.tokens))[idx]
    want = np.asarray(remap_no_hash(config.block_hash_fn(jnp.asarray(chain_from, jnp.uint32),
                                                         jnp.asarray(tokens, jnp.int32))))
    for p in idx[(want != block_hash[idx]).any(axis=1)]:
      bad("chain", f"page {p}: hash {block_hash[p].tolist()} is not its tokens' hash onto its "
                   f"{'namespace' if parent[p] == -1 else f'parent {parent[p]}'}")
  return [m for kind in out.values() for m in (kind if limit is None else kind[:limit])]


def check_invariants(state: CacheState, config: CacheConfig) -> CacheState:
  """Raise ``InvariantError`` (listing every violation) unless the cache's bookkeeping is
  consistent (the module docstring lists what is checked); host-side, returns ``state``.

  Meant for tests, debugging and after restoring a cache from storage; it reads the
  whole state to the host (O(P + B * M + index capacity)).

  >>> import jax.numpy as jnp
  >>> import kvjax
  >>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
  ...                         num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> _, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1, 2, 3]]),
  ...                         jnp.array([3]), config=cfg)
  >>> _ = check_invariants(st, cfg)
  >>> try:
  ...   check_invariants(st.replace(seq_lens=st.seq_lens.at[0].set(1)), cfg)
  ... except InvariantError as e:
  ...   print(e.violations[0])
  seq 0: columns past its 1 pages are not -1: [1]
  """
  violations = invariant_violations(state, config, limit=None)
  if violations:
    raise InvariantError(violations)
  return state
