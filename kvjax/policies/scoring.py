"""Eviction plumbing shared by every policy: events, masks, hashing, ``score_and_evict``.

A policy scores pages (higher = evict first); this module turns scores into victims and
holds the small pieces policies share: the ``Access`` event a cache (or the simulator)
reports after each reference, the candidate mask, and key hashing for sketches and
ghost tables. Names in shapes: P = num_pages.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax.layout.meta import PageMeta
from kvjax.prefix.hashing import fmix32
from kvjax.xla_cpu import loop_kernels_on


NEVER = 2**30          # next-use time of a block that is never referenced again
AGE_CAP = 2**23        # ages are clipped here so that class offsets stay exact in float32
CLASS_STEP = 2.0**24   # offset separating score classes (exact in float32 with AGE_CAP)


class Access(NamedTuple):
  """One reference as seen by the cache, reported to ``Policy.update`` after it happened."""

  slot: jax.Array         # int32 []  page hit or filled; -1 when the block was not cached
  key: jax.Array          # uint32 [2]  block hash of the referenced block
  hit: jax.Array          # bool []  the block was cached
  inserted: jax.Array     # bool []  a miss that was admitted into ``slot``
  evicted: jax.Array      # bool []  ``inserted`` displaced a cached (filled) page
  evicted_key: jax.Array  # uint32 [2]  hash of the displaced page ((0, 0) if none)
  clock: jax.Array        # int32 []  logical time of the reference
  next_use: jax.Array     # int32 []  oracle only: time of the block's next reference (NEVER), else -1
  filled: jax.Array       # int32 []  tokens in the referenced block
  position: jax.Array     # int32 []  block index in its sequence


def page_size_of(meta: PageMeta) -> int:
  """Tokens per page (static), read from the shape of ``meta.tokens``."""
  return int(meta.tokens.shape[-1])


def finalize(raw: jax.Array, meta: PageMeta) -> jax.Array:
  """Apply the rules common to every policy to raw scores.

  Pages held by live sequences (``ref_count > 0``) are never candidates (``-inf``);
  empty pages (``filled == 0``) are taken first (``+inf``).

  Args:
    raw: float32 [P] policy scores, higher = evict first.
    meta: page metadata.

  Returns:
    float32 [P] scores.

  >>> from kvjax.layout.meta import init_meta
  >>> m = init_meta(3, 2).replace(filled=jnp.array([1, 0, 1]), ref_count=jnp.array([0, 0, 1]))
  >>> finalize(jnp.zeros(3), m).tolist()
  [0.0, inf, -inf]
  """
  raw = raw.astype(jnp.float32)
  raw = jnp.where(meta.filled == 0, jnp.inf, raw)
  return jnp.where(meta.ref_count > 0, -jnp.inf, raw)


def age(meta: PageMeta, clock: jax.Array) -> jax.Array:
  """float32 [P] steps since each page's last access, clipped to ``AGE_CAP``."""
  return jnp.clip(clock - meta.last_access, 0, AGE_CAP).astype(jnp.float32)


def top_victims(scores: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """The ``n`` highest-scoring pages and whether each is a real candidate.

  Args:
    scores: float32 [P] from a policy (``-inf`` = not a candidate).
    n: static number of pages wanted, ``1 <= n <= P``.

  Returns:
    ``(page_ids int32 [n], valid bool [n])``, best victim first.

  >>> top_victims(jnp.array([1.0, -jnp.inf, 3.0]), 2)[0].tolist()
  [2, 0]
  """
  if not 1 <= n <= scores.shape[-1]:
    raise ValueError(f"n must be in [1, num_pages={scores.shape[-1]}], got n={n}")
  if n == 1:  # argmax is cheaper than a partial sort and picks the same page
    idx = argmax(scores)[None]
    vals = scores[idx]
  else:
    vals, idx = jax.lax.top_k(scores, n)
  return idx.astype(jnp.int32), vals > -jnp.inf


_ROW = 128


def argmax(scores: jax.Array) -> jax.Array:
  """int32 []: index of the first maximum of float32 [P] ``scores`` (``jnp.argmax``'s answer).

  Two levels (row maxima of 128-wide rows, then the winning row): XLA's CPU argmax is a
  scalar loop, while a max over rows vectorizes, so this is several times faster.

  >>> int(argmax(jnp.array([1.0, 3.0, 3.0, -jnp.inf])))
  1
  """
  p = scores.shape[0]
  if p <= _ROW:
    return jnp.argmax(scores).astype(jnp.int32)
  pad = (-p) % _ROW
  rows = jnp.pad(scores, (0, pad), constant_values=-jnp.inf).reshape(-1, _ROW)
  r = jnp.argmax(jnp.max(rows, axis=1)).astype(jnp.int32)
  return r * _ROW + jnp.argmax(rows[r]).astype(jnp.int32)


def key_hash(key: jax.Array, seed: int = 0) -> jax.Array:
  """uint32 [...] hash of uint32 [..., 2] block keys, one stream per ``seed``."""
  key = key.astype(jnp.uint32)
  h = fmix32(key[..., 0] + jnp.uint32((0x9E3779B9 * (seed + 1)) & 0xFFFFFFFF))
  return fmix32(h ^ (key[..., 1] * jnp.uint32(0x27D4EB2F)))


def bucket(key: jax.Array, size, seed: int = 0) -> jax.Array:
  """int32 [...] bucket in ``[0, size)`` of uint32 [..., 2] keys (``size`` may be traced)."""
  size = jnp.maximum(jnp.asarray(size), 1).astype(jnp.uint32)
  return (key_hash(key, seed) % size).astype(jnp.int32)


def live_pages(meta: PageMeta) -> jax.Array:
  """int32 []: pages in the pool that can hold a block (filled, or free to take).

  The simulator pins the empty pages beyond a run's capacity, so this is the capacity;
  policies size hashed tables by it so that runs padded to a larger pool behave alike.
  """
  return jnp.sum((meta.filled > 0) | (meta.ref_count == 0)).astype(jnp.int32)


POOL_PAGES = "pool_pages"  # params key: the pool's live pages, set by a caller scoring a sample


def pool_pages(meta: PageMeta, params) -> jax.Array:
  """int32 []: the whole pool's ``live_pages``, for a score: ``params[POOL_PAGES]`` where
  the caller scores a sample of the pages (the sampled simulator), else
  ``live_pages(meta)``.

  >>> from kvjax.layout.meta import init_meta
  >>> int(pool_pages(init_meta(4, 16), {})), int(pool_pages(init_meta(4, 16), {POOL_PAGES: 9}))
  (4, 9)
  """
  n = params.get(POOL_PAGES)
  return live_pages(meta) if n is None else jnp.asarray(n, jnp.int32)


def same_key(a: jax.Array, b: jax.Array) -> jax.Array:
  """bool [...]: uint32 [..., 2] keys equal and not the empty key (0, 0)."""
  nonzero = (b[..., 0] != 0) | (b[..., 1] != 0)
  return (a[..., 0] == b[..., 0]) & (a[..., 1] == b[..., 1]) & nonzero


class Deferred(NamedTuple):
  """An array whose latest writes are held back as a few (index, value) pairs.

  XLA on CPU copies a whole loop-carried array every step when a value read from it is
  used after the array is written in the same step (measured 10-1000x slower). Policy
  state that is written per reference is therefore kept as ``Deferred``: ``update``
  first ``settle``s last step's writes (writes only), then reads and records new writes
  with ``put``; ``get`` and ``view`` see the pending writes.
  """

  array: jax.Array  # [R, ...] stored rows
  index: jax.Array  # int32 [K]  rows of the pending writes (R = none), applied in order
  value: jax.Array  # [K, ...] their values


def deferred(array: jax.Array, slots: int = 2) -> Deferred:
  """``array`` with room for ``slots`` pending row writes per update.

  >>> d = put(deferred(jnp.zeros(3, jnp.int32)), jnp.int32(1), 5, jnp.bool_(True))
  >>> view(d).tolist(), int(get(d, jnp.int32(1)))
  ([0, 5, 0], 5)
  """
  n = array.shape[0]
  return Deferred(array, jnp.full((slots,), n, jnp.int32),
                  jnp.zeros((slots,) + array.shape[1:], array.dtype))


def settle(d: Deferred) -> Deferred:
  """Apply the pending writes (in order) and clear them."""
  n = d.array.shape[0]
  k = d.index.shape[0]
  if k == 1 or loop_kernels_on():
    # one write per row, in order (of writes to one row the last one counts): XLA makes
    # each an in-place dynamic-update-slice, which a loop kernel can hold (kvjax.xla_cpu)
    arr = d.array
    for j in range(k):
      arr = arr.at[d.index[j]].set(d.value[j], mode="drop")
  else:  # one scatter (one task in XLA:CPU's graph instead of k)
    later = jnp.triu(d.index[:, None] == d.index[None, :], 1).any(axis=1)
    arr = d.array.at[jnp.where(later, n, d.index)].set(d.value, mode="drop")
  return Deferred(arr, jnp.full_like(d.index, n), d.value)


def settle_all(tree):
  """``settle`` every ``Deferred`` in a pytree."""
  return jax.tree.map(lambda x: settle(x) if isinstance(x, Deferred) else x, tree,
                      is_leaf=lambda x: isinstance(x, Deferred))


def get(d: Deferred, i: jax.Array) -> jax.Array:
  """Row ``i`` (int32 [], in range) as of the latest pending write."""
  out = d.array[i]
  for k in range(d.index.shape[0]):
    out = jnp.where(d.index[k] == i, d.value[k], out)
  return out


def view(d: Deferred) -> jax.Array:
  """The whole array with pending writes applied (elementwise; fuses into a score)."""
  rows = jnp.arange(d.array.shape[0]).reshape((-1,) + (1,) * (d.array.ndim - 1))
  out = d.array
  for k in range(d.index.shape[0]):
    out = jnp.where(rows == d.index[k], d.value[k], out)
  return out


def put(d: Deferred, i: jax.Array, value, cond: jax.Array) -> Deferred:
  """Record ``d[i] = value`` where ``cond``, in the first free pending slot.

  Raises nothing in jit: the caller sizes ``slots`` to the writes one update makes.
  """
  n = d.array.shape[0]
  free = d.index >= n
  k = jnp.argmax(free)
  ok = cond & free[k] & (i >= 0) & (i < n)
  index = d.index.at[k].set(jnp.where(ok, i, d.index[k]))
  value = d.value.at[k].set(jnp.where(ok, jnp.asarray(value, d.value.dtype), d.value[k]))
  return Deferred(d.array, index, value)
