"""Chained 64-bit block hashes as two uint32 lanes, computed inside jit.

A block of ``S`` tokens is hashed together with its parent block's hash, so a
block's hash names the whole prefix up to and including it. The chain starts
at a namespace seed (model fingerprint, adapter id, tenant salt) computed on
the host by ``namespace_seed``. ``(0, 0)`` is reserved for "no hash" (empty
page / empty index slot): a real hash that lands there is remapped to
``ZERO_REMAP``.

The default mixer, ``block_hash``, is a two-lane reduction of MurmurHash3's
x86_128 round structure with cross-lane feed-forward:

  state (h1, h2) = parent
  for each token word k (the int32 token's bits as uint32):
    k1 = rotl(k * C1, 15) * C2;  h1 = (rotl(h1 ^ k1, 13) + h2) * 5 + N1
    k2 = rotl(k * C3, 17) * C4;  h2 = (rotl(h2 ^ k2, 15) + h1) * 5 + N2
  h1 ^= S; h2 ^= S; h1 += h2; h2 += h1
  h1 = fmix32(h1); h2 = fmix32(h2); h1 += h2; h2 += h1

Each absorption step is a bijection of the 64-bit state for a fixed token and
injective in the token for a fixed state, so (for blocks of equal length) two
different parents with the same tokens never collide, nor do two blocks that
differ in one token under the same parent (before the ``(0, 0)`` remap,
which merges two of the 2**64 outputs). ``fmix32`` gives the avalanche.

The hash function is injectable: anything with the ``HashFn`` signature can
be passed (as a static argument) to ``chain_hashes`` and the prefix matcher,
e.g. a test's always-colliding function. Matches are always verified against
the stored tokens, so the hash only has to be good, not collision-proof.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# HashFn(parent uint32[..., 2], tokens int32[..., S]) -> uint32[..., 2], never (0, 0).
HashFn = Callable[[jax.Array, jax.Array], jax.Array]

NO_HASH = (0, 0)
ZERO_REMAP = (0x9E3779B9, 0x7F4A7C15)  # where a real hash of (0, 0) is sent

_C1 = np.uint32(0x239B961B)
_C2 = np.uint32(0xAB0E9789)
_C3 = np.uint32(0x38B34AE5)
_C4 = np.uint32(0xA1E38B93)
_N1 = np.uint32(0x561CCD1B)
_N2 = np.uint32(0x0BCAA747)
_F1 = np.uint32(0x85EBCA6B)
_F2 = np.uint32(0xC2B2AE35)


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (a bijection with full avalanche), elementwise.

  Args:
    h: uint32 array of any shape.

  Returns:
    uint32 array of the same shape.

  >>> int(fmix32(jnp.uint32(1)))
  1364076727
  """
  h = jnp.asarray(h, jnp.uint32)
  h = h ^ (h >> np.uint32(16))
  h = h * _F1
  h = h ^ (h >> np.uint32(13))
  h = h * _F2
  return h ^ (h >> np.uint32(16))


def remap_no_hash(h: jax.Array) -> jax.Array:
  """``h`` with every ``(0, 0)`` replaced by ``ZERO_REMAP``.

  Args:
    h: uint32[..., 2].

  Returns:
    uint32[..., 2], never ``(0, 0)``.

  >>> remap_no_hash(jnp.zeros((2,), jnp.uint32)).tolist() == list(ZERO_REMAP)
  True
  """
  h = jnp.asarray(h, jnp.uint32)
  zero = jnp.all(h == 0, axis=-1, keepdims=True)
  return jnp.where(zero, jnp.asarray(ZERO_REMAP, jnp.uint32), h)


def _check_hash_shape(fn: str, name: str, x) -> None:
  if x.ndim < 1 or x.shape[-1] != 2:
    raise ValueError(f"{fn}: {name} must have shape [..., 2] (two uint32 lanes), "
                     f"got shape {tuple(x.shape)}")


def _token_words(tokens: jax.Array) -> jax.Array:
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}")
  return lax.bitcast_convert_type(tokens.astype(jnp.int32), jnp.uint32)


@jax.jit
def block_hash(parent: jax.Array, tokens: jax.Array) -> jax.Array:
  """Hash of one block of tokens chained onto its parent's hash (the default ``HashFn``).

  Args:
    parent: uint32[..., 2]  the previous block's hash (or the namespace seed).
    tokens: int32[..., S]  the block's token ids; leading axes broadcast with
      ``parent``'s.

  Returns:
    uint32[..., 2]  the block's hash, never ``(0, 0)``.

  >>> seed = jnp.array([1, 2], jnp.uint32)
  >>> h = block_hash(seed, jnp.arange(4, dtype=jnp.int32))
  >>> h.shape, h.dtype
  ((2,), dtype('uint32'))
  >>> bool(jnp.all(h == block_hash(seed, jnp.arange(4, dtype=jnp.int32))))
  True
  """
  parent = jnp.asarray(parent, jnp.uint32)
  tokens = jnp.asarray(tokens)
  _check_hash_shape("block_hash", "parent", parent)
  if tokens.ndim < 1:
    raise ValueError(f"block_hash: tokens must have shape [..., S], "
                     f"got shape {tuple(tokens.shape)}")
  size = tokens.shape[-1]
  batch = jnp.broadcast_shapes(parent.shape[:-1], tokens.shape[:-1])
  words = jnp.broadcast_to(_token_words(tokens), batch + (size,))
  parent = jnp.broadcast_to(parent, batch + (2,))

  def absorb(state, k):
    h1, h2 = state
    k1 = _rotl(k * _C1, 15) * _C2
    h1 = (_rotl(h1 ^ k1, 13) + h2) * np.uint32(5) + _N1
    k2 = _rotl(k * _C3, 17) * _C4
    h2 = (_rotl(h2 ^ k2, 15) + h1) * np.uint32(5) + _N2
    return (h1, h2), None

  state = (parent[..., 0], parent[..., 1])
  if size:
    state, _ = lax.scan(absorb, state, jnp.moveaxis(words, -1, 0), unroll=min(size, 16))
  h1, h2 = state
  length = np.uint32(size)
  h1 = h1 ^ length
  h2 = h2 ^ length
  h1 = h1 + h2
  h2 = h2 + h1
  h1 = fmix32(h1)
  h2 = fmix32(h2)
  h1 = h1 + h2
  h2 = h2 + h1
  return remap_no_hash(jnp.stack([h1, h2], axis=-1))


@functools.partial(jax.jit, static_argnames=("page_size", "hash_fn"))
def chain_hashes(seed: jax.Array, tokens: jax.Array, *, page_size: int,
                 hash_fn: HashFn = block_hash) -> jax.Array:
  """Chained hashes of consecutive full blocks: block i's parent is block i-1's hash.

  Args:
    seed: uint32[..., 2]  namespace seed (parent of block 0); broadcasts with
      the leading axes of ``tokens``.
    tokens: int32[..., N * page_size]  token ids; only full blocks are hashed.
    page_size: S, tokens per block (static).
    hash_fn: the ``HashFn`` (static); ``block_hash`` by default. Its output
      is passed through ``remap_no_hash``.

  Returns:
    uint32[..., N, 2]  the hash of each block.

  >>> seed = jnp.array([7, 9], jnp.uint32)
  >>> h = chain_hashes(seed, jnp.arange(8, dtype=jnp.int32), page_size=4)
  >>> h.shape
  (2, 2)
  >>> bool(jnp.all(h[1] == block_hash(h[0], jnp.arange(4, 8, dtype=jnp.int32))))
  True
  """
  seed = jnp.asarray(seed, jnp.uint32)
  tokens = jnp.asarray(tokens)
  _check_hash_shape("chain_hashes", "seed", seed)
  if not isinstance(page_size, int) or page_size <= 0:
    raise ValueError(f"chain_hashes: page_size must be a positive int, got {page_size!r}")
  if tokens.ndim < 1 or tokens.shape[-1] % page_size:
    raise ValueError(f"chain_hashes: tokens must have shape [..., N * page_size] with "
                     f"page_size={page_size}, got shape {tuple(tokens.shape)}")
  n = tokens.shape[-1] // page_size
  batch = jnp.broadcast_shapes(seed.shape[:-1], tokens.shape[:-1])
  blocks = jnp.broadcast_to(tokens, batch + tokens.shape[-1:]).reshape(batch + (n, page_size))
  if n == 0:
    return jnp.zeros(batch + (0, 2), jnp.uint32)

  def step(parent, block):
    h = remap_no_hash(hash_fn(parent, block))
    return h, h

  _, hashes = lax.scan(step, jnp.broadcast_to(seed, batch + (2,)), jnp.moveaxis(blocks, -2, 0))
  return jnp.moveaxis(hashes, 0, -2)


@functools.partial(jax.jit, static_argnames=("hash_fn",))
def page_hashes(meta_block_hash: jax.Array, parent_pages: jax.Array, seed: jax.Array,
                tokens: jax.Array, hash_fn: HashFn = block_hash) -> jax.Array:
  """Chained hashes of blocks whose previous block is a cached page (e.g. pages that just filled).

  The parent hash of each block is ``meta_block_hash[parent_pages]``, or ``seed``
  where ``parent_pages`` is -1 (the block starts its sequence).

  Args:
    meta_block_hash: uint32 [P, 2]  stored hash of each page (``PageMeta.block_hash``).
    parent_pages: int32 [N]  page of each block's previous block, -1 at a sequence start.
    seed: uint32 [2] or [N, 2]  namespace seed of each block's sequence.
    tokens: int32 [N, S]  the blocks' tokens.
    hash_fn: the ``HashFn`` (static).

  Returns:
    uint32 [N, 2]  the blocks' hashes, never ``(0, 0)``.

  >>> seed = jnp.array([4, 5], jnp.uint32)
  >>> toks = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
  >>> h0 = page_hashes(jnp.zeros((2, 2), jnp.uint32), jnp.array([-1]), seed, toks[:1])
  >>> h1 = page_hashes(jnp.zeros((2, 2), jnp.uint32).at[1].set(h0[0]), jnp.array([1]), seed,
  ...                  toks[1:])
  >>> bool(jnp.all(jnp.concatenate([h0, h1]) == chain_hashes(seed, toks.reshape(-1), page_size=4)))
  True
  """
  meta_block_hash = jnp.asarray(meta_block_hash, jnp.uint32)
  parent_pages = jnp.asarray(parent_pages, jnp.int32)
  seed = jnp.asarray(seed, jnp.uint32)
  tokens = jnp.asarray(tokens, jnp.int32)
  if meta_block_hash.ndim != 2 or meta_block_hash.shape[1] != 2:
    raise ValueError(f"page_hashes: meta_block_hash must have shape [P, 2], "
                     f"got shape {tuple(meta_block_hash.shape)}")
  if tokens.ndim != 2:
    raise ValueError(f"page_hashes: tokens must have shape [N, S], got shape {tuple(tokens.shape)}")
  n = tokens.shape[0]
  if parent_pages.shape != (n,):
    raise ValueError(f"page_hashes: parent_pages must have shape [N]=({n},), "
                     f"got shape {tuple(parent_pages.shape)}")
  if seed.shape not in ((2,), (n, 2)):
    raise ValueError(f"page_hashes: seed must have shape [2] or [N, 2]=({n}, 2), "
                     f"got shape {tuple(seed.shape)}")
  parent_hash = meta_block_hash[jnp.maximum(parent_pages, 0)]
  parent_hash = jnp.where((parent_pages < 0)[:, None], jnp.broadcast_to(seed, (n, 2)), parent_hash)
  return remap_no_hash(hash_fn(parent_hash, tokens))


def _field_bytes(name: str, value: Union[str, int, None]) -> bytes:
  if value is None:
    tag, raw = b"n", b""
  elif isinstance(value, bool):
    raise ValueError(f"namespace_seed: {name} must be a str, int or None, got bool {value!r}")
  elif isinstance(value, int):
    tag, raw = b"i", str(value).encode("ascii")
  elif isinstance(value, str):
    tag, raw = b"s", value.encode("utf-8")
  else:
    raise ValueError(f"namespace_seed: {name} must be a str, int or None, "
                     f"got {type(value).__name__} {value!r}")
  return tag + len(raw).to_bytes(8, "little") + raw


def namespace_seed(model_fingerprint: str, adapter_id: Union[str, int, None] = None,
                   tenant_salt: Union[str, int, None] = None) -> np.ndarray:
  """The chain seed of a namespace, computed on the host (BLAKE2b, deterministic).

  Fields are type-tagged and length-prefixed, so ``("ab", "c")`` and
  ``("a", "bc")``, or ``1`` and ``"1"``, give different seeds.

  Args:
    model_fingerprint: identifies the model weights (e.g. a file digest).
    adapter_id: LoRA/adapter identity, or None for the base model.
    tenant_salt: per-tenant salt; tenants with different salts never share pages.

  Returns:
    np.uint32[2], never ``(0, 0)``.

  >>> s = namespace_seed("smollm2-135m", None, "tenant-a")
  >>> s.dtype, s.shape
  (dtype('uint32'), (2,))
  >>> bool((s != namespace_seed("smollm2-135m", None, "tenant-b")).any())
  True
  """
  if not isinstance(model_fingerprint, str):
    raise ValueError(f"namespace_seed: model_fingerprint must be a str, "
                     f"got {type(model_fingerprint).__name__} {model_fingerprint!r}")
  digest = hashlib.blake2b(digest_size=8, person=b"kvjax-ns-v1")
  for name, value in (("model_fingerprint", model_fingerprint), ("adapter_id", adapter_id),
                      ("tenant_salt", tenant_salt)):
    digest.update(_field_bytes(name, value))
  seed = np.frombuffer(digest.digest(), dtype="<u4").astype(np.uint32)
  if not seed.any():
    seed = np.asarray(ZERO_REMAP, np.uint32)
  return seed
