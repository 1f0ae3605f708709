"""PrefixIndex: a jitted hash table from 64-bit block hash to page id, with keyed placement.

Layout: ``capacity`` slots (a power of two) in buckets of ``bucket_size`` W
consecutive slots (8, or the capacity if smaller). Each slot holds a key (two
uint32 lanes) and a value: a page id ``>= 0``, ``EMPTY`` (-1, never used) or
``TOMBSTONE`` (-2, deleted). Key ``(0, 0)`` is reserved for "no hash" and is
never stored.

**Placement is keyed.** A hash has two home buckets, read off
``halfsiphash64(hash, placement_key)`` (HalfSipHash-2-4, a keyed PRF made for
hash-table flooding; 64-bit output, one 32-bit word per home). The 64-bit
``placement_key`` is an array in the index state, drawn from ``secrets`` once
per process by default (``index_init(..., key=...)`` fixes it for reproducible
runs). Block hashes themselves stay unkeyed and stable (content addressing);
only where they sit in this table is secret. A client that knows the block
hash function, and so every hash it causes, but not the key, cannot tell which
buckets a hash homes to: the PRF's outputs are indistinguishable from random
without the key, so a crafted set of blocks spreads like a random one. (With
the public ``fmix32`` home of before, 33 crafted blocks on one home slot
overflowed the probe budget and kept a victim's block out of the cache.)

**Two choices over bucketed linear probing.** From each home bucket ``h_c``
(c = 0, 1) a key may sit in bucket ``h_c + d`` for ``d < max_probes`` (a probe
reads one whole bucket); it sits at the smallest such ``d`` that had a free
slot when it was inserted, on the choice with the smaller ``d`` (then the
emptier bucket, then a keyed coin). So no bucket on its path before it has an
``EMPTY`` slot, and:

* lookup reads both paths one bucket per step (a ``while_loop``; usually one
  step) and stops on a path at the first bucket holding an ``EMPTY`` slot
  (tombstones are passed);
* insert first looks the key up (found: its value is overwritten in place),
  otherwise claims a free slot (``EMPTY`` or ``TOMBSTONE``) at the nearer
  choice. Inserts of one batch are placed in rounds: each pending item picks a
  free slot of its bucket (a pseudo-random one of the bucket's free slots, so
  several items fill one bucket in a round), the lowest batch position wins each
  slot (a scatter-min), losers retry on the updated table. An item with no free
  slot on either path is reported in ``overflow`` and the table is unchanged
  for it: never a silent drop;
* delete turns the key's slot into a ``TOMBSTONE``, or ``EMPTY`` when its
  bucket already has an ``EMPTY`` slot (no path passes such a bucket); inserts
  reuse tombstones, ``index_rebuild`` clears them.

Two choices keep paths short: 90 % full, a table of 2**17 slots places every
key within a few buckets of one of its homes, where one choice needs ~100
(random keys, sequential inserts). Duplicate keys within one insert batch: the
**last** valid occurrence wins (as if the batch were applied to a dict in
order; found by rounds of a salted scatter-max, no sort; the salt is keyed
too); every occurrence reports the winner's overflow. All functions are pure
and jitted; the index is a pytree (``max_probes`` and ``bucket_size`` are
static metadata, the key is a traced array: a new key needs no new compile).
"""

from __future__ import annotations

import functools
import secrets
from typing import NamedTuple, Optional, Union

from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kvjax.prefix.hashing import block_hash
from kvjax.prefix.hashing import chain_hashes
from kvjax.prefix.hashing import fmix32
from kvjax.prefix.hashing import HashFn


EMPTY = -1       # slot never used: probe paths stop at a bucket holding one
TOMBSTONE = -2   # slot of a deleted key: probes pass, inserts reuse
BUCKET_SIZE = 8  # slots per bucket (default)
MAX_PROBES = 16  # buckets a path may probe from each home (default; docs/ARCHITECTURE.md: why not 8)

_PROCESS_KEY: Optional[np.ndarray] = None


@struct.dataclass
class PrefixIndex:
  """Bucketed two-choice table: block hash -> page id. Build with ``index_init``."""

  keys: jax.Array    # uint32 [C, 2]  block hash per slot ((0, 0) when EMPTY/TOMBSTONE)
  values: jax.Array  # int32 [C]  page id >= 0, EMPTY (-1) or TOMBSTONE (-2)
  placement_key: jax.Array  # uint32 [2]  secret HalfSipHash key of the placement
  max_probes: int = struct.field(pytree_node=False, default=MAX_PROBES)  # buckets per home
  bucket_size: int = struct.field(pytree_node=False, default=BUCKET_SIZE)  # W slots/bucket

  @property
  def capacity(self) -> int:
    return self.values.shape[0]

  @property
  def num_buckets(self) -> int:
    return self.capacity // self.bucket_size


def process_key() -> np.ndarray:
  """This process's placement key: 64 bits from ``secrets``, drawn on first use.

  Returns:
    np.uint32[2] (the same array on every call in one process).

  >>> bool((process_key() == process_key()).all()), process_key().dtype
  (True, dtype('uint32'))
  """
  global _PROCESS_KEY
  if _PROCESS_KEY is None:
    _PROCESS_KEY = np.frombuffer(secrets.token_bytes(8), dtype="<u4").astype(np.uint32)
  return _PROCESS_KEY.copy()


def _placement_key(key) -> jax.Array:
  if key is None:
    return jnp.asarray(process_key())
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    if not 0 <= int(key) < 2**64:
      raise ValueError(f"index_init: an int key must be in [0, 2**64), got {key!r}")
    return jnp.asarray([int(key) & 0xFFFFFFFF, int(key) >> 32], jnp.uint32)
  arr = np.asarray(key)
  if arr.shape != (2,) or arr.dtype != np.uint32:
    raise ValueError(f"index_init: key must be None, an int in [0, 2**64) or a uint32 "
                     f"array of shape [2], got {key!r}")
  return jnp.asarray(arr)


def index_init(capacity: int, max_probes: Optional[int] = None, *,
               key: Union[None, int, np.ndarray, jax.Array] = None,
               bucket_size: Optional[int] = None) -> PrefixIndex:
  """An empty index.

  Args:
    capacity: C, number of slots; a power of two.
    max_probes: static budget, buckets probed from each of a key's two homes,
      ``1 <= max_probes <= C / bucket_size``; default ``min(16, C / bucket_size)``.
    key: the placement key: None (default) is this process's secret key
      (``process_key``); an int in ``[0, 2**64)`` or a uint32 [2] array fixes it
      (reproducible tests). Only placement depends on it, never block hashes.
    bucket_size: W, slots per bucket, a power of two ``<= C``; default
      ``min(8, C)``.

  Returns:
    A ``PrefixIndex`` with all slots ``EMPTY``.

  >>> index = index_init(64, max_probes=4, key=7)
  >>> index.capacity, index.num_buckets, index.max_probes, index.placement_key.tolist()
  (64, 8, 4, [7, 0])
  """
  if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0 \
      or capacity & (capacity - 1):
    raise ValueError(f"index_init: capacity must be a positive power of two, got {capacity!r}")
  if bucket_size is None:
    bucket_size = min(BUCKET_SIZE, capacity)
  if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or bucket_size <= 0 \
      or bucket_size & (bucket_size - 1) or bucket_size > capacity:
    raise ValueError(f"index_init: bucket_size must be a power of two <= capacity={capacity}, "
                     f"got {bucket_size!r}")
  num_buckets = capacity // bucket_size
  if max_probes is None:
    max_probes = min(MAX_PROBES, num_buckets)
  if not isinstance(max_probes, int) or isinstance(max_probes, bool) \
      or not 1 <= max_probes <= num_buckets:
    raise ValueError(f"index_init: max_probes (buckets per home) must be an int in "
                     f"[1, capacity / bucket_size = {num_buckets}], got {max_probes!r}")
  return PrefixIndex(keys=jnp.zeros((capacity, 2), jnp.uint32),
                     values=jnp.full((capacity,), EMPTY, jnp.int32),
                     placement_key=_placement_key(key),
                     max_probes=max_probes, bucket_size=bucket_size)


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _sipround(v0, v1, v2, v3):
  v0 = v0 + v1
  v1 = _rotl(v1, 5) ^ v0
  v0 = _rotl(v0, 16)
  v2 = v2 + v3
  v3 = _rotl(v3, 8) ^ v2
  v0 = v0 + v3
  v3 = _rotl(v3, 7) ^ v0
  v2 = v2 + v1
  v1 = _rotl(v1, 13) ^ v2
  v2 = _rotl(v2, 16)
  return v0, v1, v2, v3


def halfsiphash64(words: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """HalfSipHash-2-4 with 64-bit output of an 8-byte message, elementwise.

  The message is the two uint32 words little-endian (``words[..., 0]`` first),
  the key ``key[0]``, ``key[1]`` likewise; the output is the reference
  implementation's 8 bytes as two little-endian uint32 words. They come as a
  pair, not stacked: on XLA:CPU a stack (or concatenate) of them pulls the whole
  mix into a concatenate fusion that runs 10-40x slower than the mix itself.

  Args:
    words: uint32[..., 2]  the message (a block hash).
    key: uint32[2]  the 64-bit key.

  Returns:
    ``(out0, out1)``, uint32[...] each.

  Reference vector (key bytes 00..07, message bytes 00..07: ``ed fe e8 20 bc e4 85 8c``):

  >>> out = halfsiphash64(jnp.array([0x03020100, 0x07060504], jnp.uint32),
  ...                     jnp.array([0x03020100, 0x07060504], jnp.uint32))
  >>> [hex(int(w)) for w in out]
  ['0x20e8feed', '0x8c85e4bc']
  """
  words = jnp.asarray(words, jnp.uint32)
  key = jnp.asarray(key, jnp.uint32)
  k0, k1 = key[0], key[1]
  v0 = jnp.broadcast_to(k0, words.shape[:-1])
  v1 = jnp.broadcast_to(k1 ^ np.uint32(0xEE), words.shape[:-1])
  v2 = jnp.broadcast_to(k0 ^ np.uint32(0x6C796765), words.shape[:-1])
  v3 = jnp.broadcast_to(k1 ^ np.uint32(0x74656462), words.shape[:-1])
  for m in (words[..., 0], words[..., 1], jnp.full(words.shape[:-1], 8 << 24, jnp.uint32)):
    v3 = v3 ^ m
    for _ in range(2):
      v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 = v0 ^ m
  v2 = v2 ^ np.uint32(0xEE)
  for _ in range(4):
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
  out0 = v1 ^ v3
  v1 = v1 ^ np.uint32(0xDD)
  for _ in range(4):
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
  return out0, v1 ^ v3


def home_buckets(hashes: jax.Array, key: jax.Array,
                 num_buckets: int) -> tuple[jax.Array, jax.Array]:
  """The two home buckets of each hash: the words of ``halfsiphash64(hash, key)``, masked.

  Args:
    hashes: uint32[..., 2]  block hashes.
    key: uint32[2]  the placement key (``PrefixIndex.placement_key``).
    num_buckets: a power of two.

  Returns:
    ``(home0, home1)``, int32[...] each, in ``[0, num_buckets)`` (a pair, see
    ``halfsiphash64``); under another placement key a hash lands elsewhere.

  >>> h = jnp.array([[1, 2]], jnp.uint32)
  >>> a = home_buckets(h, jnp.array([1, 0], jnp.uint32), 1 << 16)
  >>> b = home_buckets(h, jnp.array([2, 0], jnp.uint32), 1 << 16)
  >>> a[0].shape, bool((a[0] != b[0]) | (a[1] != b[1]))
  ((1,), True)
  """
  return _homes(halfsiphash64(hashes, key), num_buckets)


def _homes(mixed, num_buckets: int) -> tuple[jax.Array, jax.Array]:
  """The two home buckets, int32 each, from the keyed hash's words ``mixed``."""
  return tuple((w & np.uint32(num_buckets - 1)).astype(jnp.int32) for w in mixed)


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


def _bucket_slots(index: PrefixIndex, bucket: jax.Array) -> jax.Array:
  """int32 [..., W]: the slots of each bucket in ``bucket`` int32 [...]."""
  return bucket[..., None] * index.bucket_size + jnp.arange(index.bucket_size, dtype=jnp.int32)


def placement_mix(index: PrefixIndex, hashes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``halfsiphash64(hashes, index.placement_key)``: what places ``hashes`` (uint32 [N, 2]) in
  ``index``, a pair of uint32 [N].

  The keyed hash is most of the index operations' code (XLA compile time): a
  caller that looks up, inserts and deletes the same hashes computes it once
  and passes it to each (their ``mixed`` argument).

  >>> index = index_init(8)
  >>> h = jnp.array([[1, 2]], jnp.uint32)
  >>> mixed = placement_mix(index, h)
  >>> index, _ = index_insert(index, h, jnp.array([5], jnp.int32), mixed=mixed)
  >>> index_lookup(index, h, mixed=mixed).tolist(), index_lookup(index, h).tolist()
  ([5], [5])
  """
  return halfsiphash64(jnp.asarray(hashes, jnp.uint32), index.placement_key)


def _check_mixed(mixed, n: int):
  if mixed is None:
    return None
  if len(mixed) != 2 or any(jnp.shape(w) != (n,) for w in mixed):
    raise ValueError(f"mixed must be placement_mix(index, hashes), a pair of uint32 [N]=({n},), "
                     f"got shapes {[jnp.shape(w) for w in mixed]}")
  return tuple(jnp.asarray(w, jnp.uint32) for w in mixed)


def _find(index: PrefixIndex, hashes: jax.Array, valid: jax.Array, mixed=None) -> jax.Array:
  """int32 [N]: the slot holding each valid hash, or -1.

  Reads bucket ``home + d`` of both paths per step, d = 0, 1, ...; a path ends at
  a bucket holding an EMPTY slot (tombstones are passed) or at the budget.
  ``mixed``: ``placement_mix(index, hashes)``, or None to compute it.
  """
  nb = index.num_buckets
  if mixed is None:
    mixed = placement_mix(index, hashes)
  homes = _homes(mixed, nb)   # the two paths, int32 [N] each
  n = hashes.shape[0]

  def probe(carry):
    depth, slot, done0, done1 = carry
    dones = []
    for home, done in zip(homes, (done0, done1)):
      slots = _bucket_slots(index, (home + depth) & (nb - 1))             # [N, W]
      vals = index.values[slots]
      match = jnp.all(index.keys[slots] == hashes[:, None, :], axis=-1) & (vals >= 0)
      match &= ~done[:, None]
      hit = jnp.any(match, axis=1)
      at = jnp.take_along_axis(slots, jnp.argmax(match, axis=1)[:, None], axis=1)[:, 0]
      slot = jnp.where(hit, at, slot)
      dones.append(done | jnp.any(vals == EMPTY, axis=1))
    found = slot >= 0
    return depth + 1, slot, dones[0] | found, dones[1] | found

  def more(carry):
    depth, _, done0, done1 = carry
    return (depth < index.max_probes) & ~jnp.all(done0 & done1)

  init = (jnp.zeros((), jnp.int32), jnp.full((n,), -1, jnp.int32), ~valid, ~valid)
  return lax.while_loop(more, probe, init)[1]


@jax.jit
def index_lookup(index: PrefixIndex, hashes: jax.Array,
                 valid: Optional[jax.Array] = None, *, mixed=None) -> jax.Array:
  """Page id stored under each hash.

  Args:
    index: the table.
    hashes: uint32 [N, 2].
    valid: bool [N] (default all True); invalid items and ``(0, 0)`` miss.
    mixed: ``placement_mix(index, hashes)`` when the caller has it (it must be that
      value), else None.

  Returns:
    int32 [N]: page id, or -1 on a miss.

  >>> index = index_init(8)
  >>> h = jnp.array([[1, 2], [3, 4]], jnp.uint32)
  >>> index, _ = index_insert(index, h[:1], jnp.array([5], jnp.int32))
  >>> index_lookup(index, h).tolist()
  [5, -1]
  """
  hashes, valid, n = _prepare("index_lookup", hashes, valid)
  slot = _find(index, hashes, valid, _check_mixed(mixed, n))
  return jnp.where(slot >= 0, index.values[jnp.maximum(slot, 0)], -1)


def _last_occurrence(hashes: jax.Array, valid: jax.Array, key: jax.Array) -> jax.Array:
  """For each valid item, the batch position of the last valid item with the same key.

  Rounds of a scatter-max of batch positions into a scratch array of ~4N cells,
  addressed by a salted mix of the key (the salt starts from the placement key,
  so a client cannot aim items at one cell, and changes every round). Items
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

  salt = fmix32(key[0] ^ fmix32(key[1] ^ np.uint32(0x7F4A7C15)))
  return lax.while_loop(lambda carry: jnp.any(carry[2]), resolve_round, (salt, idx, valid))[1]


def _kth_true(mask: jax.Array, k: jax.Array) -> jax.Array:
  """int32 [N]: column of the k-th (from 0) True of each row of ``mask`` [N, W]."""
  rank = jnp.cumsum(mask, axis=1) - 1
  return jnp.argmax(mask & (rank == k[:, None]), axis=1).astype(jnp.int32)


@jax.jit
def index_insert(index: PrefixIndex, hashes: jax.Array, values: jax.Array,
                 valid: Optional[jax.Array] = None, *,
                 mixed=None) -> tuple[PrefixIndex, jax.Array]:
  """Insert (or overwrite) a batch of hash -> page entries.

  Args:
    index: the table.
    hashes: uint32 [N, 2]  keys; ``(0, 0)`` items are ignored.
    values: int32 [N]  page ids, ``>= 0`` (items with a negative value are ignored).
    valid: bool [N] (default all True)  items to insert.
    mixed: ``placement_mix(index, hashes)`` when the caller has it (it must be that
      value), else None.

  Returns:
    ``(index, overflow)``: the new table and bool [N], True for each valid item
    that could not be stored (no free slot in the ``max_probes`` buckets from
    either home); the table is unchanged for those. Duplicate keys: the last
    valid one wins.

  >>> index = index_init(4, max_probes=1)
  >>> h = jnp.array([[1, 2], [1, 2], [3, 4]], jnp.uint32)
  >>> index, overflow = index_insert(index, h, jnp.array([7, 8, 9], jnp.int32))
  >>> index_lookup(index, h[:1]).tolist(), overflow.tolist()
  ([8], [False, False, False])
  """
  values = jnp.asarray(values, jnp.int32)
  hashes, valid, n = _prepare("index_insert", hashes, valid, values=values)
  capacity, nb, width = index.capacity, index.num_buckets, index.bucket_size
  valid = valid & (values >= 0)
  idx = jnp.arange(n, dtype=jnp.int32)
  winner_of = _last_occurrence(hashes, valid, index.placement_key)
  winner = valid & (winner_of == idx)

  mixed = _check_mixed(mixed, n)
  if mixed is None:
    mixed = placement_mix(index, hashes)
  existing = _find(index, hashes, winner, mixed)
  table_values = index.values.at[jnp.where(existing >= 0, existing, capacity)].set(
      values, mode="drop")
  homes = _homes(mixed, nb)   # int32 [N] each
  coin = mixed[0] >> np.uint32(31) == 1  # keyed tie-break between the choices
  budget = index.max_probes

  def place_round(carry):
    # Each pending item reads the bucket at its depth on both paths, takes the nearer
    # one with a free slot (then the emptier, then its coin) and claims a pseudo-random
    # free slot there; per slot the lowest batch position wins. Full buckets are passed.
    keys, vals, pending, overflow, depth0, depth1, turn = carry
    reads = []
    for home, depth in zip(homes, (depth0, depth1)):
      bucket = (home + depth) & (nb - 1)
      free = vals[_bucket_slots(index, bucket)] < 0                         # [N, W]
      num_free = jnp.sum(free, axis=1, dtype=jnp.int32)
      usable = (depth < budget) & (num_free > 0)
      score = jnp.where(usable, depth * (width + 1) + width - num_free, jnp.iinfo(jnp.int32).max)
      reads.append((bucket, free, num_free, usable, score))
    (bucket0, free0, num0, usable0, score0), (bucket1, free1, num1, usable1, score1) = reads
    pick1 = jnp.where(score0 == score1, coin, score1 < score0)
    claiming = pending & (usable0 | usable1)
    picked_free = jnp.where(pick1[:, None], free1, free0)                   # [N, W]
    picked_num = jnp.maximum(jnp.where(pick1, num1, num0), 1).astype(jnp.uint32)
    spread = fmix32((idx.astype(jnp.uint32) * np.uint32(0x9E3779B9)) ^ turn)
    column = _kth_true(picked_free, (spread % picked_num).astype(jnp.int32))
    candidate = jnp.where(pick1, bucket1, bucket0) * width + column
    target = jnp.where(claiming, candidate, capacity)
    claim = jnp.full((capacity,), n, jnp.int32).at[target].min(idx, mode="drop")
    won = claiming & (claim[jnp.minimum(target, capacity - 1)] == idx)
    write = jnp.where(won, candidate, capacity)
    keys = keys.at[write].set(hashes, mode="drop")
    vals = vals.at[write].set(values, mode="drop")
    depth0 = jnp.where(pending & (num0 == 0), depth0 + 1, depth0)
    depth1 = jnp.where(pending & (num1 == 0), depth1 + 1, depth1)
    exhausted = pending & ~claiming & (depth0 >= budget) & (depth1 >= budget)
    return (keys, vals, pending & ~won & ~exhausted, overflow | exhausted, depth0, depth1,
            turn + np.uint32(1))

  zeros = jnp.zeros((n,), jnp.int32)
  init = (index.keys, table_values, winner & (existing < 0), jnp.zeros((n,), jnp.bool_),
          zeros, zeros, jnp.zeros((), jnp.uint32))
  keys, table_values, _, overflow, _, _, _ = lax.while_loop(
      lambda carry: jnp.any(carry[2]), place_round, init)
  overflow = valid & overflow[winner_of]
  return index.replace(keys=keys, values=table_values), overflow


@jax.jit
def index_delete(index: PrefixIndex, hashes: jax.Array, valid: Optional[jax.Array] = None,
                 expected: Optional[jax.Array] = None, *, mixed=None) -> PrefixIndex:
  """Remove a batch of keys (absent keys are ignored).

  Args:
    index: the table.
    hashes: uint32 [N, 2].
    valid: bool [N] (default all True)  items to delete.
    expected: int32 [N] or None. If given, an entry is removed only when its
      stored page id equals ``expected`` (so evicting page p never removes the
      entry of another page q that holds the same block).
    mixed: ``placement_mix(index, hashes)`` when the caller has it (it must be that
      value), else None.

  Returns:
    The table without those keys: a slot becomes ``EMPTY`` when its bucket
    already holds an ``EMPTY`` slot (no probe path passes such a bucket), else
    a ``TOMBSTONE``.

  >>> index = index_init(8)
  >>> h = jnp.array([[1, 2]], jnp.uint32)
  >>> index, _ = index_insert(index, h, jnp.array([5], jnp.int32))
  >>> index_lookup(index_delete(index, h), h).tolist()
  [-1]
  """
  if expected is not None:
    expected = jnp.asarray(expected, jnp.int32)
  hashes, valid, n = _prepare("index_delete", hashes, valid, expected=expected)
  capacity = index.capacity
  slot = _find(index, hashes, valid, _check_mixed(mixed, n))
  if expected is not None:
    slot = jnp.where(index.values[jnp.maximum(slot, 0)] == expected, slot, -1)
  bucket = jnp.maximum(slot, 0) // index.bucket_size
  bucket_has_empty = jnp.any(index.values[_bucket_slots(index, bucket)] == EMPTY, axis=-1)
  target = jnp.where(slot >= 0, slot, capacity)
  keys = index.keys.at[target].set(jnp.zeros((2,), jnp.uint32), mode="drop")
  values = index.values.at[target].set(jnp.where(bucket_has_empty, EMPTY, TOMBSTONE),
                                       mode="drop")
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
  """The same entries re-inserted into a fresh table (same key): no tombstones, short paths.

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

  >>> from kvjax.prefix.hashing import namespace_seed
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
