"""Block hashing: a pure-Python reference, sensitivity, distribution, jit, namespaces."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hash_reference import M32
from hash_reference import fmix_py
from kvjax import prefix
from kvjax.prefix.hashing import block_hash
from kvjax.prefix.hashing import chain_hashes
from kvjax.prefix.hashing import namespace_seed
from kvjax.prefix.hashing import page_hashes



# ---- independent reference: the mixer spelled out on Python ints ------------------------------

def _rotl_py(x, r):
  return ((x << r) | (x >> (32 - r))) & M32


def block_hash_py(parent, tokens):
  """The documented mixer on Python ints (token words are the int32 bits)."""
  h1, h2 = int(parent[0]), int(parent[1])
  for t in tokens:
    k = int(t) & M32
    k1 = (_rotl_py((k * 0x239B961B) & M32, 15) * 0xAB0E9789) & M32
    h1 = ((_rotl_py(h1 ^ k1, 13) + h2) * 5 + 0x561CCD1B) & M32
    k2 = (_rotl_py((k * 0x38B34AE5) & M32, 17) * 0xA1E38B93) & M32
    h2 = ((_rotl_py(h2 ^ k2, 15) + h1) * 5 + 0x0BCAA747) & M32
  n = len(tokens)
  h1 ^= n
  h2 ^= n
  h1 = (h1 + h2) & M32
  h2 = (h2 + h1) & M32
  h1, h2 = fmix_py(h1), fmix_py(h2)
  h1 = (h1 + h2) & M32
  h2 = (h2 + h1) & M32
  if (h1, h2) == (0, 0):
    return (0x9E3779B9, 0x7F4A7C15)
  return (h1, h2)


def _as_tuples(h):
  return [tuple(int(x) for x in row) for row in np.asarray(h).reshape(-1, 2)]


# ---- tests ------------------------------------------------------------------------------------

def test_fmix32_known_values():
  # MurmurHash3 fmix32: 0 -> 0 (a fixed point), and agrees with the Python spelling.
  xs = np.array([0, 1, 2, 0xDEADBEEF, M32], np.uint32)
  assert [int(v) for v in prefix.fmix32(jnp.asarray(xs))] == [fmix_py(int(x)) for x in xs]
  assert int(prefix.fmix32(jnp.uint32(0))) == 0


def test_block_hash_matches_python_reference():
  rng = np.random.default_rng(0)
  parents = rng.integers(0, 2**32, size=(64, 2), dtype=np.uint64).astype(np.uint32)
  tokens = rng.integers(-2**31, 2**31, size=(64, 16), dtype=np.int64).astype(np.int32)
  tokens[0, :4] = [0, -1, 2**31 - 1, -2**31]  # extremes of the int32 range
  got = _as_tuples(block_hash(jnp.asarray(parents), jnp.asarray(tokens)))
  want = [block_hash_py(p, t) for p, t in zip(parents.tolist(), tokens.tolist())]
  assert got == want


@pytest.mark.parametrize("size", [1, 3, 16, 33])
def test_block_hash_reference_other_sizes(size):
  rng = np.random.default_rng(size)
  parents = rng.integers(0, 2**32, size=(8, 2), dtype=np.uint64).astype(np.uint32)
  tokens = rng.integers(0, 50_000, size=(8, size)).astype(np.int32)
  got = _as_tuples(block_hash(jnp.asarray(parents), jnp.asarray(tokens)))
  assert got == [block_hash_py(p, t) for p, t in zip(parents.tolist(), tokens.tolist())]


def test_jit_equals_eager():
  rng = np.random.default_rng(1)
  parents = jnp.asarray(rng.integers(0, 2**32, size=(4, 2), dtype=np.uint64).astype(np.uint32))
  tokens = jnp.asarray(rng.integers(0, 50_000, size=(4, 3)).astype(np.int32))
  with jax.disable_jit():
    eager = np.asarray(block_hash(parents, tokens))
    eager_chain = np.asarray(chain_hashes(parents, jnp.tile(tokens, (1, 2)), page_size=3))
  np.testing.assert_array_equal(np.asarray(jax.jit(block_hash)(parents, tokens)), eager)
  np.testing.assert_array_equal(
      np.asarray(chain_hashes(parents, jnp.tile(tokens, (1, 2)), page_size=3)), eager_chain)


def test_deterministic_and_broadcasting():
  seed = jnp.asarray(namespace_seed("m", None, "t"))
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(3, 8)
  a = block_hash(seed, tokens)  # seed broadcasts over the 3 blocks
  b = block_hash(jnp.broadcast_to(seed, (3, 2)), tokens)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(block_hash(seed, tokens)))
  assert a.shape == (3, 2) and a.dtype == jnp.uint32


def test_chain_matches_reference_and_sequential_block_hash():
  seed = namespace_seed("model", "adapter-1", 42)
  tokens = np.random.default_rng(2).integers(0, 50_000, size=5 * 4).astype(np.int32)
  got = _as_tuples(chain_hashes(jnp.asarray(seed), jnp.asarray(tokens), page_size=4))
  parent, want = tuple(int(x) for x in seed), []
  for i in range(5):
    parent = block_hash_py(parent, tokens[4 * i:4 * i + 4].tolist())
    want.append(parent)
  assert got == want


def test_chain_batched_seeds():
  seeds = jnp.asarray(np.stack([namespace_seed("m", None, s) for s in ("a", "b")]))
  tokens = jnp.arange(12, dtype=jnp.int32)
  h = chain_hashes(seeds, tokens, page_size=4)
  assert h.shape == (2, 3, 2)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(h[i]),
                                  np.asarray(chain_hashes(seeds[i], tokens, page_size=4)))
  assert _as_tuples(h[0]) != _as_tuples(h[1])


def test_sensitivity_one_token_each_position():
  rng = np.random.default_rng(3)
  parent = (123, 456)
  base = rng.integers(0, 50_000, size=16).astype(np.int32)
  h0 = _as_tuples(block_hash(jnp.asarray(parent, jnp.uint32), jnp.asarray(base)))[0]
  variants = np.tile(base, (16 * 3, 1))
  for pos in range(16):
    for j, delta in enumerate((1, -1, 1 << 20)):
      variants[3 * pos + j, pos] += delta
  hs = _as_tuples(block_hash(jnp.asarray(parent, jnp.uint32), jnp.asarray(variants)))
  assert h0 not in hs and len(set(hs)) == len(hs)


def test_sensitivity_parent_and_salt():
  tokens = jnp.arange(16, dtype=jnp.int32)
  parents = jnp.asarray([[1, 0], [0, 1], [2, 0], [1, 1], [M32, M32]], jnp.uint32)
  assert len(set(_as_tuples(block_hash(parents, tokens)))) == 5
  seeds = [namespace_seed("m", None, salt) for salt in ("a", "b", 0, 1, None)]
  hs = [_as_tuples(chain_hashes(jnp.asarray(s), tokens, page_size=8)) for s in seeds]
  firsts = {h[0] for h in hs}
  lasts = {h[1] for h in hs}
  assert len(firsts) == 5 and len(lasts) == 5  # every block of the chain depends on the salt


def test_no_collisions_100k_random_blocks():
  rng = np.random.default_rng(4)
  parents = rng.integers(0, 2**32, size=(100_000, 2), dtype=np.uint64).astype(np.uint32)
  tokens = rng.integers(0, 50_000, size=(100_000, 16)).astype(np.int32)
  h = np.asarray(block_hash(jnp.asarray(parents), jnp.asarray(tokens)))
  as64 = h[:, 0].astype(np.uint64) << np.uint64(32) | h[:, 1].astype(np.uint64)
  assert len(np.unique(as64)) == 100_000
  # each lane alone is a 32-bit hash: ~1.16 birthday collisions expected among 100k; a bad lane
  # (e.g. one ignoring a token) would give thousands.
  for lane in range(2):
    assert 100_000 - len(np.unique(h[:, lane])) < 20
  # lanes look uniform: every top-4-bit bucket holds ~1/16 of the hashes (6250 +- 5 sigma)
  for lane in range(2):
    counts = np.bincount(h[:, lane] >> 28, minlength=16)
    assert np.all(np.abs(counts - 6250) < 5 * np.sqrt(6250))


def test_low_entropy_blocks_no_collisions():
  # Structured inputs (sequential ids, all-equal blocks) are what real prompts look like.
  tokens = np.arange(20_000 * 4, dtype=np.int32).reshape(20_000, 4) % 7919
  equal = np.repeat(np.arange(20_000, dtype=np.int32)[:, None], 4, axis=1)
  h = np.concatenate([np.asarray(block_hash(jnp.zeros(2, jnp.uint32) + 1, jnp.asarray(t)))
                      for t in (tokens, equal)])
  as64 = h[:, 0].astype(np.uint64) << np.uint64(32) | h[:, 1].astype(np.uint64)
  assert len(np.unique(as64)) == len(np.unique(np.concatenate([tokens, equal]), axis=0))


def test_avalanche():
  # Flipping one input bit flips each output bit with probability ~1/2.
  rng = np.random.default_rng(5)
  n = 512
  parents = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
  tokens = rng.integers(0, 2**31, size=(n, 4)).astype(np.int32)
  base = np.asarray(block_hash(jnp.asarray(parents), jnp.asarray(tokens)))
  flips = []
  for word in range(6):  # 2 parent lanes + 4 tokens
    for bit in (0, 7, 19, 31):
      p, t = parents.copy(), tokens.copy()
      if word < 2:
        p[:, word] ^= np.uint32(1 << bit)
      else:
        t[:, word - 2] = (t[:, word - 2].view(np.uint32) ^ np.uint32(1 << bit)).view(np.int32)
      h = np.asarray(block_hash(jnp.asarray(p), jnp.asarray(t)))
      diff = np.unpackbits((base ^ h).view(np.uint8), axis=1)  # [n, 64]
      flips.append(diff.mean(axis=0))
  flips = np.stack(flips)  # [inputs, 64 output bits], each a mean over 512 samples
  # sd of one mean is 0.5/sqrt(512) = 0.022: allow ~6 sd
  assert np.all(np.abs(flips - 0.5) < 0.13), np.abs(flips - 0.5).max()


def test_page_hashes_extend_chains():
  seed = namespace_seed("m", None, "t")
  toks = np.arange(3 * 4, dtype=np.int32).reshape(3, 4)
  want = np.asarray(chain_hashes(jnp.asarray(seed), jnp.asarray(toks.reshape(-1)), page_size=4))
  meta_hash = np.zeros((5, 2), np.uint32)
  meta_hash[4], meta_hash[2] = want[0], want[1]  # block 0 in page 4, block 1 in page 2
  got = page_hashes(jnp.asarray(meta_hash), jnp.array([-1, 4, 2]), jnp.asarray(seed),
                    jnp.asarray(toks))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_zero_hash_is_remapped():
  assert _as_tuples(prefix.remap_no_hash(jnp.zeros((3, 2), jnp.uint32))) == \
      [prefix.ZERO_REMAP] * 3
  # The empty block under a (0, 0) parent is exactly the mixer's zero point.
  assert _as_tuples(block_hash(jnp.zeros(2, jnp.uint32), jnp.zeros((0,), jnp.int32))) == \
      [prefix.ZERO_REMAP]
  always_zero = lambda parent, tokens: jnp.zeros(parent.shape, jnp.uint32)  # noqa: E731
  h = chain_hashes(jnp.ones(2, jnp.uint32), jnp.arange(8, dtype=jnp.int32), page_size=4,
                   hash_fn=always_zero)
  assert _as_tuples(h) == [prefix.ZERO_REMAP] * 2


def test_injectable_hash_fn():
  calls = []

  def colliding(parent, tokens):
    calls.append(tokens.shape)
    return jnp.broadcast_to(jnp.asarray([5, 5], jnp.uint32), parent.shape)

  h = chain_hashes(jnp.ones(2, jnp.uint32), jnp.arange(12, dtype=jnp.int32), page_size=4,
                   hash_fn=colliding)
  assert _as_tuples(h) == [(5, 5)] * 3 and calls


def test_namespace_seed_reference_and_properties():
  s = namespace_seed("fp", "lora", 3)
  ref = hashlib.blake2b(digest_size=8, person=b"kvjax-ns-v1")
  for tag, raw in ((b"s", b"fp"), (b"s", b"lora"), (b"i", b"3")):
    ref.update(tag + len(raw).to_bytes(8, "little") + raw)
  assert s.tolist() == np.frombuffer(ref.digest(), "<u4").tolist()
  assert s.dtype == np.uint32 and s.shape == (2,)
  assert namespace_seed("fp", "lora", 3).tolist() == s.tolist()  # deterministic
  seeds = {tuple(namespace_seed(*args).tolist()) for args in [
      ("fp", "lora", 3), ("fp", "lora", "3"), ("fp", None, 3), ("fp", "lora", 4),
      ("fp2", "lora", 3), ("fpl", "ora", 3), ("fp", "lor", "a3"), ("fp", None, None)]}
  assert len(seeds) == 8


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="parent"):
    block_hash(jnp.zeros((3,), jnp.uint32), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="page_size=4"):
    chain_hashes(jnp.zeros((2,), jnp.uint32), jnp.zeros((6,), jnp.int32), page_size=4)
  with pytest.raises(ValueError, match="tenant_salt"):
    namespace_seed("m", None, 1.5)
  with pytest.raises(ValueError, match="model_fingerprint"):
    namespace_seed(3)
