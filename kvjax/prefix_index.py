"""PrefixIndex: a jitted open-addressing hash table from 64-bit block hash to page id.

Layout: ``capacity`` slots (a power of two), each a key (two uint32 lanes) and a
value: a page id ``>= 0``, ``EMPTY`` (-1, never used) or ``TOMBSTONE`` (-2, deleted).
Key ``(0, 0)`` is reserved for "no hash" and is never stored.

Probing is linear from a home slot (``fmix32`` of the two lanes, masked), and
bounded by a static budget ``max_probes``: a key lives within ``max_probes``
slots of its home, with no ``EMPTY`` slot between its home and it. So:

* lookup reads the window in chunks of 8 probes (a ``while_loop`` that ends when
  every item has met its key, an ``EMPTY`` slot or the budget; usually one chunk)
  and takes the first live slot holding the key before the first ``EMPTY`` one
  (tombstones are passed, not stops);
* insert first looks the key up (found: its value is overwritten in place),
  otherwise claims the first free slot (``EMPTY`` or ``TOMBSTONE``) in the
  window. Inserts that claim the same slot in one batch are resolved in rounds:
  each round every pending item names its first free slot, the lowest batch
  position wins each slot (a scatter-min of item ids), losers resume after the
  slot they lost. An item whose window has no free slot left is reported in
  ``overflow`` and the table is unchanged for it: never a silent drop;
* delete turns the key's slot into a ``TOMBSTONE`` (or ``EMPTY`` when the next
  slot is ``EMPTY``, which no probe chain can cross), keeping later keys of
  the chain reachable; inserts reuse tombstones.

Duplicate keys within one insert batch: the **last** valid occurrence wins
(as if the batch were applied to a dict in order; found by rounds of a salted
scatter-max, no sort); every occurrence reports the winner's overflow. All
functions are pure and jitted; the index is a pytree
(``max_probes`` is static metadata).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from kvjax.hashing import HashFn
from kvjax.hashing import block_hash
from kvjax.hashing import chain_hashes
from kvjax.hashing import fmix32

EMPTY = -1       # slot never used: probe chains stop here
TOMBSTONE = -2   # slot of a deleted key: probes pass, inserts reuse


@struct.dataclass
class PrefixIndex:
  """Open-addressing table: block hash -> page id. Build with ``index_init``."""

  keys: jax.Array    # uint32 [C, 2]  block hash per slot ((0, 0) when EMPTY/TOMBSTONE)
  values: jax.Array  # int32 [C]  page id >= 0, EMPTY (-1) or TOMBSTONE (-2)
  max_probes: int = struct.field(pytree_node=False, default=32)  # static probe budget

  @property
  def capacity(self) -> int:
    return self.values.shape[0]


def index_init(capacity: int, max_probes: Optional[int] = None) -> PrefixIndex:
  """An empty index.

  Args:
    capacity: C, number of slots; a power of two.
    max_probes: static probe budget, 1 <= max_probes <= capacity; default
      ``min(32, capacity)``.

  Returns:
    A ``PrefixIndex`` with all slots ``EMPTY``.

  >>> index = index_init(16, max_probes=4)
  >>> index.capacity, index.max_probes
  (16, 4)
  """
  if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0 \
      or capacity & (capacity - 1):
    raise ValueError(f"index_init: capacity must be a positive power of two, got {capacity!r}")
  if max_probes is None:
    max_probes = min(32, capacity)
  if not isinstance(max_probes, int) or isinstance(max_probes, bool) \
      or not 1 <= max_probes <= capacity:
    raise ValueError(f"index_init: max_probes must be an int in [1, capacity={capacity}], "
                     f"got {max_probes!r}")
  return PrefixIndex(keys=jnp.zeros((capacity, 2), jnp.uint32),
                     values=jnp.full((capacity,), EMPTY, jnp.int32),
                     max_probes=max_probes)


def home_slot(hashes: jax.Array, capacity: int) -> jax.Array:
  """Home slot of each hash: ``fmix32(lane0 ^ fmix32(lane1)) & (capacity - 1)``.

  Args:
    hashes: uint32[..., 2].
    capacity: power of two.

  Returns:
    int32[...] in ``[0, capacity)``.

  >>> int(home_slot(jnp.array([1, 0], jnp.uint32), 1024)) < 1024
  True
  """
  hashes = jnp.asarray(hashes, jnp.uint32)
  mixed = fmix32(hashes[..., 0] ^ fmix32(hashes[..., 1]))
  return (mixed & np.uint32(capacity - 1)).astype(jnp.int32)


def _check_batch(fn: str, hashes, **columns) -> int:
  if hashes.ndim != 2 or hashes.shape[1] != 2:
    raise ValueError(f"{fn}: hashes must have shape [N, 2], got shape {tuple(hashes.shape)}")
  n = hashes.shape[0]
  for name, x in columns.items():
    if x is not None and x.shape != (n,):
      raise ValueError(f"{fn}: {name} must have shape [N]=({n},) like hashes, "
                       f"got shape {tuple(x.shape)}")
  return n


def _prepare(fn: str, hashes, valid, **columns):
  hashes = jnp.asarray(hashes, jnp.uint32)
  valid = None if valid is None else jnp.asarray(valid, jnp.bool_)
  n = _check_batch(fn, hashes, valid=valid, **columns)
  if valid is None:
    valid = jnp.ones((n,), jnp.bool_)
  valid = valid & jnp.any(hashes != 0, axis=-1)  # (0, 0) is "no hash": never stored
  return hashes, valid, n


_CHUNK = 8  # probes read per loop iteration: most keys sit within a few slots of home


def _chunk_slots(index: PrefixIndex, home: jax.Array, offset: jax.Array):
  """Slots ``offset .. offset + chunk - 1`` of each probe window, and which are in budget.

  Args:
    home: int32 [N]; offset: int32 [] or [N].

  Returns:
    (slots int32 [N, c], in_budget bool [N, c]) with c = min(_CHUNK, max_probes).
  """
  chunk = min(_CHUNK, index.max_probes)
  probe = jnp.reshape(offset, (-1, 1)) + jnp.arange(chunk, dtype=jnp.int32)   # [N or 1, c]
  slots = (home[:, None] + probe) & (index.capacity - 1)
  return slots, jnp.broadcast_to(probe < index.max_probes, slots.shape)


def _first(mask: jax.Array, slots: jax.Array):
  """(any, position, slot) of the first True of each row of ``mask`` [N, c]."""
  pos = jnp.argmax(mask, axis=1).astype(jnp.int32)
  return jnp.any(mask, axis=1), pos, jnp.take_along_axis(slots, pos[:, None], axis=1)[:, 0]


def _find(index: PrefixIndex, hashes: jax.Array, valid: jax.Array) -> jax.Array:
  """int32 [N]: the slot holding each valid hash, or -1.

  Probes in chunks until each item meets its key or an EMPTY slot (tombstones are
  passed) or runs out of budget.
  """
  home = home_slot(hashes, index.capacity)
  chunk = min(_CHUNK, index.max_probes)

  def probe_chunk(carry):
    offset, slot, done = carry
    slots, in_budget = _chunk_slots(index, home, offset)
    vals = index.values[slots]
    match = jnp.all(index.keys[slots] == hashes[:, None, :], axis=-1) & (vals >= 0) & in_budget
    stop = match | (vals == EMPTY) | ~in_budget
    any_stop, pos, at = _first(stop, slots)
    hit = ~done & any_stop & jnp.take_along_axis(match, pos[:, None], axis=1)[:, 0]
    return offset + chunk, jnp.where(hit, at, slot), done | any_stop

  def more(carry):
    offset, _, done = carry
    return (offset < index.max_probes) & ~jnp.all(done)

  n = hashes.shape[0]
  init = (jnp.zeros((), jnp.int32), jnp.full((n,), -1, jnp.int32), ~valid)
  return lax.while_loop(more, probe_chunk, init)[1]


@jax.jit
def index_lookup(index: PrefixIndex, hashes: jax.Array,
                 valid: Optional[jax.Array] = None) -> jax.Array:
  """Page id stored under each hash.

  Args:
    index: the table.
    hashes: uint32 [N, 2].
    valid: bool [N] (default all True); invalid items and ``(0, 0)`` miss.

  Returns:
    int32 [N]: page id, or -1 on a miss.

  >>> index = index_init(8)
  >>> h = jnp.array([[1, 2], [3, 4]], jnp.uint32)
  >>> index, _ = index_insert(index, h[:1], jnp.array([5], jnp.int32))
  >>> index_lookup(index, h).tolist()
  [5, -1]
  """
  hashes, valid, _ = _prepare("index_lookup", hashes, valid)
  slot = _find(index, hashes, valid)
  return jnp.where(slot >= 0, index.values[jnp.maximum(slot, 0)], -1)


def _last_occurrence(hashes: jax.Array, valid: jax.Array) -> jax.Array:
  """For each valid item, the batch position of the last valid item with the same key.

  Rounds of a scatter-max of batch positions into a scratch array of ~4N cells,
  addressed by a salted mix of the key (the salt changes every round). Items
  with the key of their cell's maximum are resolved (equal keys always share a
  cell, so that maximum is their key's last occurrence); the others retry with
  a new salt. Cheaper than a sort on CPU; usually 2-3 rounds.

  Returns:
    int32 [N] (the item itself where not ``valid``); an item wins iff it is its own.
  """
  n = hashes.shape[0]
  cells = max(16, 1 << (4 * n - 1).bit_length())
  idx = jnp.arange(n, dtype=jnp.int32)

  def resolve_round(carry):
    salt, winner_of, unresolved = carry
    cell = (fmix32(hashes[:, 0] ^ fmix32(hashes[:, 1] ^ salt)) & np.uint32(cells - 1))
    cell = cell.astype(jnp.int32)
    top = jnp.full((cells,), -1, jnp.int32).at[jnp.where(unresolved, cell, cells)].max(
        idx, mode="drop")[cell]
    same = unresolved & jnp.all(hashes[jnp.maximum(top, 0)] == hashes, axis=-1)
    return salt + np.uint32(0x9E3779B9), jnp.where(same, top, winner_of), unresolved & ~same

  init = (jnp.uint32(0x7F4A7C15), idx, valid)
  return lax.while_loop(lambda carry: jnp.any(carry[2]), resolve_round, init)[1]


@jax.jit
def index_insert(index: PrefixIndex, hashes: jax.Array, values: jax.Array,
                 valid: Optional[jax.Array] = None) -> tuple[PrefixIndex, jax.Array]:
  """Insert (or overwrite) a batch of hash -> page entries.

  Args:
    index: the table.
    hashes: uint32 [N, 2]  keys; ``(0, 0)`` items are ignored.
    values: int32 [N]  page ids, ``>= 0`` (items with a negative value are ignored).
    valid: bool [N] (default all True)  items to insert.

  Returns:
    ``(index, overflow)``: the new table and bool [N], True for each valid item
    that could not be stored (no free slot within ``max_probes`` of its home);
    the table is unchanged for those. Duplicate keys: the last valid one wins.

  >>> index = index_init(4, max_probes=1)
  >>> h = jnp.array([[1, 2], [1, 2], [3, 4]], jnp.uint32)
  >>> index, overflow = index_insert(index, h, jnp.array([7, 8, 9], jnp.int32))
  >>> index_lookup(index, h[:1]).tolist(), overflow.shape
  ([8], (3,))
  """
  values = jnp.asarray(values, jnp.int32)
  hashes, valid, n = _prepare("index_insert", hashes, valid, values=values)
  capacity = index.capacity
  valid = valid & (values >= 0)
  idx = jnp.arange(n, dtype=jnp.int32)
  winner_of = _last_occurrence(hashes, valid)
  winner = valid & (winner_of == idx)

  existing = _find(index, hashes, winner)
  table_values = index.values.at[jnp.where(existing >= 0, existing, capacity)].set(
      values, mode="drop")
  home = home_slot(hashes, capacity)

  def place_round(carry):
    # Each pending item looks for its first free slot from its own offset on; per slot
    # the lowest batch position wins; losers resume after the slot they lost.
    keys, vals, pending, overflow, offset = carry
    slots, in_budget = _chunk_slots(index, home, offset)
    free = (vals[slots] < 0) & in_budget
    has_free, pos, candidate = _first(free, slots)
    exhausted = pending & ~has_free & (offset + slots.shape[1] >= index.max_probes)
    claiming = pending & has_free
    target = jnp.where(claiming, candidate, capacity)
    claim = jnp.full((capacity,), n, jnp.int32).at[target].min(idx, mode="drop")
    won = claiming & (claim[jnp.minimum(target, capacity - 1)] == idx)
    write = jnp.where(won, candidate, capacity)
    keys = keys.at[write].set(hashes, mode="drop")
    vals = vals.at[write].set(values, mode="drop")
    offset = jnp.where(has_free, offset + pos + 1, offset + slots.shape[1])
    return keys, vals, pending & ~won & ~exhausted, overflow | exhausted, offset

  init = (index.keys, table_values, winner & (existing < 0), jnp.zeros((n,), jnp.bool_),
          jnp.zeros((n,), jnp.int32))
  keys, table_values, _, overflow, _ = lax.while_loop(
      lambda carry: jnp.any(carry[2]), place_round, init)
  overflow = valid & overflow[winner_of]
  return index.replace(keys=keys, values=table_values), overflow


@jax.jit
def index_delete(index: PrefixIndex, hashes: jax.Array, valid: Optional[jax.Array] = None,
                 expected: Optional[jax.Array] = None) -> PrefixIndex:
  """Remove a batch of keys (absent keys are ignored).

  Args:
    index: the table.
    hashes: uint32 [N, 2].
    valid: bool [N] (default all True)  items to delete.
    expected: int32 [N] or None. If given, an entry is removed only when its
      stored page id equals ``expected`` (so evicting page p never removes the
      entry of another page q that holds the same block).

  Returns:
    The table without those keys.

  >>> index = index_init(8)
  >>> h = jnp.array([[1, 2]], jnp.uint32)
  >>> index, _ = index_insert(index, h, jnp.array([5], jnp.int32))
  >>> index_lookup(index_delete(index, h), h).tolist()
  [-1]
  """
  if expected is not None:
    expected = jnp.asarray(expected, jnp.int32)
  hashes, valid, _ = _prepare("index_delete", hashes, valid, expected=expected)
  capacity = index.capacity
  slot = _find(index, hashes, valid)
  if expected is not None:
    slot = jnp.where(index.values[jnp.maximum(slot, 0)] == expected, slot, -1)
  next_empty = index.values[(slot + 1) & (capacity - 1)] == EMPTY
  target = jnp.where(slot >= 0, slot, capacity)
  keys = index.keys.at[target].set(jnp.zeros((2,), jnp.uint32), mode="drop")
  values = index.values.at[target].set(jnp.where(next_empty, EMPTY, TOMBSTONE), mode="drop")
  return index.replace(keys=keys, values=values)


@jax.jit
def index_counts(index: PrefixIndex) -> dict:
  """Occupancy: ``{"live", "tombstones", "empty"}`` int32 scalars.

  >>> {k: int(v) for k, v in index_counts(index_init(8)).items()}
  {'empty': 8, 'live': 0, 'tombstones': 0}
  """
  return {"live": jnp.sum(index.values >= 0, dtype=jnp.int32),
          "tombstones": jnp.sum(index.values == TOMBSTONE, dtype=jnp.int32),
          "empty": jnp.sum(index.values == EMPTY, dtype=jnp.int32)}


@jax.jit
def index_rebuild(index: PrefixIndex) -> tuple[PrefixIndex, jax.Array]:
  """The same entries re-inserted into a fresh table: no tombstones, short chains.

  Args:
    index: the table.

  Returns:
    ``(index, rebuilt)``: bool [] ``rebuilt``; when re-insertion would overflow
    (possible only for a nearly full table) the input is returned unchanged
    and ``rebuilt`` is False, so no entry is ever lost.

  >>> index, _ = index_insert(index_init(8), jnp.array([[1, 2]], jnp.uint32), jnp.array([3]))
  >>> index = index_delete(index, jnp.array([[5, 6]], jnp.uint32))
  >>> fresh, rebuilt = index_rebuild(index)
  >>> bool(rebuilt), index_lookup(fresh, jnp.array([[1, 2]], jnp.uint32)).tolist()
  (True, [3])
  """
  empty = index.replace(keys=jnp.zeros_like(index.keys),
                        values=jnp.full_like(index.values, EMPTY))
  fresh, overflow = index_insert(empty, index.keys, index.values, index.values >= 0)
  rebuilt = ~jnp.any(overflow)
  return jax.tree.map(lambda new, old: jnp.where(rebuilt, new, old), fresh, index), rebuilt


class PrefixMatch(NamedTuple):
  """Result of ``match_prefix``: B sequences, K = T // S blocks each."""

  pages: jax.Array        # int32 [B, K]  verified cached page of each leading block (-1 after)
  num_matched: jax.Array  # int32 [B]  leading full blocks served from the cache
  hashes: jax.Array       # uint32 [B, K, 2]  chained hash of every block of ``tokens`` (also
  #                         past num_full_pages: the keys to insert when those pages fill;
  #                         blocks past a sequence's real length hash padding, ignore them)


@functools.partial(jax.jit, static_argnames=("hash_fn",))
def match_prefix(index: PrefixIndex, meta_tokens: jax.Array, meta_parent: jax.Array,
                 seed: jax.Array, tokens: jax.Array, num_full_pages: jax.Array,
                 hash_fn: HashFn = block_hash, *,
                 meta_namespace: Optional[jax.Array] = None) -> PrefixMatch:
  """Longest verified cached prefix of each sequence, in whole blocks.

  Block k of sequence b (tokens ``[k*S, (k+1)*S)``) is matched to page p when
  all blocks before it matched, ``k < num_full_pages[b]``, the index maps the
  block's chained hash to p, and p is verified: ``meta_tokens[p]`` equals the
  block's tokens, ``meta_parent[p]`` equals the page matched for block k-1
  (-1 for block 0) and, when ``meta_namespace`` is given, the root page's
  namespace equals the sequence's seed. So a hash collision (accidental,
  crafted, or a test's always-colliding ``hash_fn``) can shorten a match but
  never hand out a page whose K/V belong to other content. This is only sound
  if page metadata always describes the page's K/V: a reused page gets new
  tokens/parent, and a page is not reused while a cached child still names it.

  Args:
    index: block hash -> page.
    meta_tokens: int32 [P, S]  token ids stored in each page (``PageMeta.tokens``).
    meta_parent: int32 [P]  page of the previous block (``PageMeta.parent``).
    seed: uint32 [2] or [B, 2]  namespace seed of each sequence (``namespace_seed``).
    tokens: int32 [B, T]  the sequences' tokens; T need not be a multiple of S.
    num_full_pages: int32 [B]  blocks to try (<= T // S), e.g. ``(len - 1) // S``
      to leave at least one token to compute.
    hash_fn: the ``HashFn`` used when the pages were inserted (static).
    meta_namespace: uint32 [P, 2] or None  the seed of the chain each page
      belongs to; checked on the root block, so tenants never share a page even
      when hashes collide.

  Returns:
    ``PrefixMatch(pages, num_matched, hashes)``.

  >>> from kvjax.hashing import namespace_seed
  >>> seed = jnp.asarray(namespace_seed("m"))
  >>> toks = jnp.arange(8, dtype=jnp.int32).reshape(1, 8)
  >>> h = chain_hashes(seed, toks[0], page_size=4)
  >>> index, _ = index_insert(index_init(8), h, jnp.array([3, 1], jnp.int32))
  >>> meta_tokens = jnp.zeros((4, 4), jnp.int32).at[3].set(toks[0, :4]).at[1].set(toks[0, 4:])
  >>> meta_parent = jnp.array([-1, 3, -1, -1], jnp.int32)
  >>> m = match_prefix(index, meta_tokens, meta_parent, seed, toks, jnp.array([2]))
  >>> m.pages.tolist(), m.num_matched.tolist()
  ([[3, 1]], [2])
  """
  meta_tokens = jnp.asarray(meta_tokens, jnp.int32)
  meta_parent = jnp.asarray(meta_parent, jnp.int32)
  seed = jnp.asarray(seed, jnp.uint32)
  tokens = jnp.asarray(tokens, jnp.int32)
  num_full_pages = jnp.asarray(num_full_pages, jnp.int32)
  if meta_tokens.ndim != 2:
    raise ValueError(f"match_prefix: meta_tokens must have shape [P, S], "
                     f"got shape {tuple(meta_tokens.shape)}")
  num_pages, page_size = meta_tokens.shape
  if meta_parent.shape != (num_pages,):
    raise ValueError(f"match_prefix: meta_parent must have shape [P]=({num_pages},), "
                     f"got shape {tuple(meta_parent.shape)}")
  if tokens.ndim != 2:
    raise ValueError(f"match_prefix: tokens must have shape [B, T], "
                     f"got shape {tuple(tokens.shape)}")
  batch, length = tokens.shape
  if num_full_pages.shape != (batch,):
    raise ValueError(f"match_prefix: num_full_pages must have shape [B]=({batch},), "
                     f"got shape {tuple(num_full_pages.shape)}")
  if seed.shape not in ((2,), (batch, 2)):
    raise ValueError(f"match_prefix: seed must have shape [2] or [B, 2]=({batch}, 2), "
                     f"got shape {tuple(seed.shape)}")
  if meta_namespace is not None:
    meta_namespace = jnp.asarray(meta_namespace, jnp.uint32)
    if meta_namespace.shape != (num_pages, 2):
      raise ValueError(f"match_prefix: meta_namespace must have shape [P, 2]=({num_pages}, 2), "
                       f"got shape {tuple(meta_namespace.shape)}")
  k = length // page_size
  seed = jnp.broadcast_to(seed, (batch, 2))
  if k == 0:
    return PrefixMatch(pages=jnp.zeros((batch, 0), jnp.int32),
                       num_matched=jnp.zeros((batch,), jnp.int32),
                       hashes=jnp.zeros((batch, 0, 2), jnp.uint32))
  blocks = tokens[:, :k * page_size].reshape(batch, k, page_size)
  want = jnp.arange(k, dtype=jnp.int32)[None, :] < num_full_pages[:, None]      # [B, K]
  hashes = chain_hashes(seed, tokens[:, :k * page_size], page_size=page_size, hash_fn=hash_fn)

  found = index_lookup(index, hashes.reshape(-1, 2), want.reshape(-1)).reshape(batch, k)
  page = jnp.clip(found, 0, num_pages - 1)
  previous = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), found[:, :-1]], axis=1)
  ok = want & (found >= 0) & (found < num_pages)
  ok &= jnp.all(meta_tokens[page] == blocks, axis=-1)
  ok &= meta_parent[page] == previous
  if meta_namespace is not None:
    root = jnp.arange(k)[None, :] == 0
    ok &= ~root | jnp.all(meta_namespace[page] == seed[:, None, :], axis=-1)
  matched = jnp.cumprod(ok.astype(jnp.int32), axis=1)
  num_matched = jnp.sum(matched, axis=1, dtype=jnp.int32)
  pages = jnp.where(matched > 0, found, -1)
  return PrefixMatch(pages=pages, num_matched=num_matched, hashes=hashes)
