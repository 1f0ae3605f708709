"""Quantized pages inside the real cache: the model's decode step, prefix reuse, fork.

The reference is independent of the cache: a full causal forward pass of the
same model whose attention reads K/V quantize-dequantized page by page with
``quant.quantize_pages`` (the per-page quantizer tested in test_quant.py),
choosing per (query, key) what the cache's rule says the query sees: with
staging (channel-axis K or a residual window R), the query at position p sees
page j quantized iff ``(j + 1) * S + R <= p + 1``; token-axis specs without
staging quantize every token as it is written. All shapes are shared between
tests so that the jitted step compiles once per spec (CPU time is scarce).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.models import LlamaConfig
from kvjax.models import decode_step
from kvjax.models import forward
from kvjax.models import init_params
from kvjax.models.llama import decoder_layer
from kvjax.models.llama import lm_logits
from kvjax.rope import rope
from kvjax import layout
from kvjax import quant
from kvjax.layout.spec import QuantSpec

CFG = LlamaConfig.small()
S, R, T = 4, 8, 8           # page size, residual window of the int2 spec, prefill chunk
N = 2                       # sink tokens of the "-sink" specs (the first N stay full precision)


def _with_window(specs, window):
  return tuple(QuantSpec(**{**s.__dict__, "residual": window}) if s.residual else s
               for s in specs)


def _with_sink(specs, sink):
  return tuple(QuantSpec(**{**s.__dict__, "sink": sink}) for s in specs)


SPECS = {name: _with_window(layout.PRESETS[name], R)
         for name in ("int8", "fp8", "int4", "int2-r64", "int2-kivi-r128")}
SPECS["int2-sink"] = _with_sink(SPECS["int2-r64"], N)   # through the ring
SPECS["int8-sink"] = _with_sink(SPECS["int8"], N)       # tokens written straight to the pool
SPECS["int2-prerope"] = (                                # and keys stored before RoPE,
    QuantSpec(**{**SPECS["int2-sink"][0].__dict__, "zero_dtype": "bfloat16",  # with the
                 "levels": layout.NUQ2_LEVELS}), SPECS["int2-sink"][1])        # 2-bit levels
PREROPE = ("int2-prerope",)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(7))


@functools.lru_cache(maxsize=None)
def cache_config(name, prefix_caching=False):   # prefix caching off: compiles ~2x faster
  ks, vs = SPECS[name]
  return CFG.cache_config(page_size=S, num_pages=40, max_seqs=2, max_pages_per_seq=10,
                          key_quant=ks, value_quant=vs, prefix_caching=prefix_caching,
                          prerope_keys=name in PREROPE)


def _emulate(x, spec):
  """x [1, N, H, D] as the pool stores it: quantize-dequantize page by page."""
  if not spec.is_quantized:
    return x
  n = x.shape[1]
  pad = -n % S
  xp = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(-1, S, *x.shape[2:])
  out = quant.dequantize_pages(quant.quantize_pages(xp, spec), spec)
  return out.reshape(1, n + pad, *x.shape[2:])[:, :n]


def reference_logits(params, tokens, specs, prerope=False):
  """float32 [N, V]: causal forward whose attention reads K/V as the cache stores them
  (``prerope``: keys quantized before RoPE, the dequantized keys then rotated)."""
  ks, vs = specs
  tokens = jnp.asarray([tokens], jnp.int32)
  n = tokens.shape[1]
  pos = jnp.arange(n)
  staged = layout.needs_staging(ks, vs)
  window = layout.residual_tokens(ks, vs)
  if staged:   # [query, key]: the key's page is folded when the query runs
    sel = ((pos[None, :] // S + 1) * S + window) <= (pos[:, None] + 1)
  else:
    sel = jnp.ones((n, n), bool)
  sel &= pos[None, :] >= layout.sink_tokens(ks, vs)       # sink keys are never quantized

  def attention(q, k, v):
    kq, vq = _emulate(k, ks), _emulate(v, vs)
    if prerope:
      kq, k = (rope(a, pos[None], CFG.rope_base) for a in (kq, k))
    kk = jnp.where(sel[:, :, None, None], kq[0][None], k[0][None])     # [Nq, Nk, H, D]
    vv = jnp.where(sel[:, :, None, None], vq[0][None], v[0][None])
    g = CFG.num_heads // CFG.num_kv_heads
    qg = q[0].reshape(n, CFG.num_kv_heads, g, CFG.head_dim)
    scores = jnp.einsum("qhgd,qkhd->qhgk", qg, kk) / np.sqrt(CFG.head_dim)
    scores = jnp.where((pos[None, :] <= pos[:, None])[:, None, None, :], scores, -jnp.inf)
    out = jnp.einsum("qhgk,qkhd->qhgd", jax.nn.softmax(scores, axis=-1), vv)
    return out.reshape(1, n, CFG.num_heads, CFG.head_dim), None

  x = params.embed[tokens]
  for i in range(CFG.num_layers):
    lp = jax.tree.map(lambda a: a[i], params.layers)
    x, _ = decoder_layer(lp, x, pos[None], attention, CFG, rope_keys=not prerope)
  return np.asarray(lm_logits(params, x, CFG))[0]


@functools.lru_cache(maxsize=None)
def jitted_decode(cc):
  """``decode_step`` for ``cc`` under one jit, traced at most twice over the whole module:
  the prefill shape (T) and the decode shape (1); a third trace (a recompile) fails."""

  def run(params, cache, tokens, seq_ids, num_new):
    return decode_step(params, cache, tokens, seq_ids, num_new, config=CFG, cache_config=cc)

  # chex counts traces per definition site and name: one name per config
  run.__name__ = f"decode_step_{jitted_decode.cache_info().currsize}"
  return functools.partial(jax.jit, donate_argnums=1)(chex.assert_max_traces(run, n=2))


def step(params, cache, cc, rows):
  """One decode_step; rows: {seq_id: tokens} for at most 2 sequences (T = max len)."""
  t = max(len(v) for v in rows.values())
  t = 1 if t == 1 else T
  toks = np.zeros((2, t), np.int32)
  ids, num = np.full(2, -1, np.int32), np.zeros(2, np.int32)
  for r, (sid, tk) in enumerate(rows.items()):
    toks[r, :len(tk)], ids[r], num[r] = tk, sid, len(tk)
  logits, cache = jitted_decode(cc)(params, cache, jnp.asarray(toks), jnp.asarray(ids),
                                    jnp.asarray(num))
  logits = np.asarray(logits)
  return {sid: logits[r, :len(tk)] for r, (sid, tk) in enumerate(rows.items())}, cache


def run(params, cache, cc, sid, tokens, chunk=T):
  """Prefill ``tokens`` in chunks of ``chunk`` (T or 1); logits [len, V]."""
  out = []
  for i in range(0, len(tokens), chunk):
    lg, cache = step(params, cache, cc, {sid: tokens[i:i + chunk]})
    out.append(lg[sid])
  return np.concatenate(out), cache


# Error of the cache against the float model, as a fraction of the largest
# logit, for this random tiny model (head_dim 16): int8 ~1/127 steps; fp8 3
# mantissa bits; int4 and int2 per-channel keys on Gaussian data (no outlier
# channels to exploit), int2 helped by its window. Measured: 0.011, 0.06, 0.18,
# 0.6 on 40 tokens; the bounds leave ~1.5x.
FLOAT_TOL = {"int8": 0.02, "fp8": 0.1, "int4": 0.3, "int2-r64": 1.0, "int2-kivi-r128": 1.0,
             "int2-sink": 1.0, "int8-sink": 0.02, "int2-prerope": 1.0}


@pytest.mark.parametrize("name", list(SPECS))
def test_decode_step_compiles_once_and_matches_quantized_reference(params, name):
  cc = cache_config(name)
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, CFG.vocab_size, 2 * T + 3).tolist()
  other = rng.integers(1, CFG.vocab_size, T).tolist()
  cache = kvjax.init(cc)
  # fp8 shares int8's cache path (token-axis, no ring): prefill it one token at a time
  # and save a compile (the suite has a CPU budget)
  chunk = 1 if name == "fp8" else T
  got0, cache = run(params, cache, cc, 0, tokens[:2 * T], chunk)
  lg1, cache = run(params, cache, cc, 1, other, chunk)      # a second sequence in the pool
  got1 = [lg1]
  got0 = [got0]
  for i in range(2 * T, 2 * T + 3):   # decode: calls 1, 2, 3 (no retrace: jitted_decode)
    lg, cache = step(params, cache, cc, {0: tokens[i:i + 1], 1: [7]})
    got0.append(lg[0])
    got1.append(lg[1])
  assert int(cache.status) == 0
  got0 = np.concatenate(got0)
  # float32 everywhere; only summation order differs from the reference
  pre = name in PREROPE
  np.testing.assert_allclose(got0, reference_logits(params, tokens, SPECS[name], pre),
                             atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(np.concatenate(got1),
                             reference_logits(params, other + [7] * 3, SPECS[name], pre),
                             atol=2e-4, rtol=2e-4)
  want = np.asarray(forward(params, jnp.asarray([tokens]), CFG))[0]
  err = np.abs(got0 - want).max() / np.abs(want).max()
  assert err < FLOAT_TOL[name], err


@pytest.mark.parametrize("name", ["int4", "int2-r64"])   # staged specs (int8 writes tokens
def test_prefix_reuse_with_quantized_pages(params, name):  # directly, as unquantized pages do)
  cc = cache_config(name, prefix_caching=True)
  rng = np.random.default_rng(2)
  first = rng.integers(1, CFG.vocab_size, 21).tolist()
  second = first[:16] + rng.integers(1, CFG.vocab_size, 12).tolist()
  cache = kvjax.init(cc)
  _, cache = run(params, cache, cc, 0, first)
  window = layout.residual_tokens(*SPECS[name])
  # a page is indexed once folded: with the window, (j + 1) * S + R <= 21
  indexed = int(jnp.sum(jnp.any(cache.meta.block_hash != 0, axis=-1)))
  assert indexed == (21 - window) // S
  cache = kvjax.release(cache, jnp.array([0]), config=cc)
  prompt = jnp.asarray([second + [0] * (32 - len(second))], jnp.int32)
  cached, cache = kvjax.attach_prefix(cache, jnp.array([1]), prompt, jnp.array([len(second)]),
                                      config=cc)
  cached = int(cached[0])
  assert cached == S * min((21 - window) // S, 16 // S)
  got, cache = run(params, cache, cc, 1, second[cached:])
  assert int(cache.status) == 0
  fresh, _ = run(params, kvjax.init(cc), cc, 1, second)
  if not window:
    # the reused pages hold exactly the codes a fresh prefill would write
    np.testing.assert_allclose(got, fresh[cached:], atol=1e-5, rtol=1e-5)
  else:
    # with a window, reused pages are seen quantized up to R tokens early (the
    # sequence that computed them had them in full precision there): the
    # logits move by about the int2 quantization error, no more
    scale = np.abs(fresh).max()
    assert np.abs(got - fresh[cached:]).max() / scale < FLOAT_TOL[name]
    assert np.abs(got - fresh[cached:]).max() > 0


@pytest.mark.parametrize("name", ["int4", "int2-r64", "int2-sink"])
def test_fork_copies_the_staging_ring(params, name):
  cc = cache_config(name)
  rng = np.random.default_rng(3)
  prompt = rng.integers(1, CFG.vocab_size, 14).tolist()   # page 3 partial: in the ring
  cache = kvjax.init(cc)
  _, cache = run(params, cache, cc, 0, prompt)
  cache = kvjax.fork(cache, jnp.array([0]), jnp.array([1]), config=cc)
  a, b = rng.integers(1, CFG.vocab_size, (2, 6)).tolist()
  got = {0: [], 1: []}
  for i in range(6):   # both append into the shared partial page, then past it
    lg, cache = step(params, cache, cc, {0: [a[i]], 1: [b[i]]})
    got[0].append(lg[0])
    got[1].append(lg[1])
  assert int(cache.status) == 0 and int(cache.stats.cow_copies) == 1
  for sid, tail in ((0, a), (1, b)):
    want = reference_logits(params, prompt + tail, SPECS[name])[len(prompt):]
    np.testing.assert_allclose(np.concatenate(got[sid]), want, atol=2e-4, rtol=2e-4)


def test_attach_takes_the_sink_from_a_live_owner_else_the_pool(params):
  """A sequence attaching a cached first page gets its sink rows from a live
  sequence on that page (full precision), else dequantized from the pool."""
  name = "int2-sink"
  cc = cache_config(name, prefix_caching=True)
  ks, vs = SPECS[name]
  rng = np.random.default_rng(4)
  first = rng.integers(1, CFG.vocab_size, 21).tolist()     # pages 0..2 folded (R = 8)
  cache = kvjax.init(cc)
  _, cache = run(params, cache, cc, 0, first)
  prompt = jnp.asarray([first[:16] + [0] * 16], jnp.int32)
  owner_rows = cache.k.sink[:, 0], cache.v.sink[:, 0]
  _, live = kvjax.attach_prefix(cache, jnp.array([1]), prompt, jnp.array([16]), config=cc)
  assert int(live.seq_lens[1]) == 12                       # pages 0, 1, 2 attached
  for got, want in zip((live.k.sink[:, 1], live.v.sink[:, 1]), owner_rows):
    np.testing.assert_array_equal(got, want)
  # no live owner: the pool's codes of page 0's first N tokens, dequantized
  gone = kvjax.release(cache, jnp.array([0]), config=cc)
  _, cold = kvjax.attach_prefix(gone, jnp.array([1]), prompt, jnp.array([16]), config=cc)
  page0 = int(cold.page_table[1, 0])
  for pages, spec in ((cold.k, ks), (cold.v, vs)):
    pool = jax.tree.map(lambda a: a[:, page0], pages.replace(stage=None, sink=None))
    want = quant.dequantize_pages(pool, spec)[:, :N].astype(pages.sink.dtype)
    np.testing.assert_array_equal(pages.sink[:, 1], want)
  assert not np.array_equal(cold.k.sink[:, 1], owner_rows[0])   # quantized: not the same
