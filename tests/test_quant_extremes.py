"""Outliers, NaN and inf in quantized pages: they cost precision in their own group only.

The rule under test (``kvjax.quant.clip_values`` / ``group_stats``): values are
clipped to ``+-quant.max_abs(spec)`` before quantizing (inf saturates, keeping
its sign), NaN is stored as 0 and counts as 0 in its group's statistics. The
reference is a numpy model written from the documented formulas, not from the
code: per group, the exact scale of the clipped group (the spec's formula),
times the most the scale encoding may round it up (log8: one code, 2**(1/8);
bf16: 2**-7; f16: 2**-10), times the spec's error in units of a scale (half a
step; fp8 448 * 2**-4; non-uniform levels their widest half-gap or end). Every
element is checked against the clean data (the outlier excepted, checked
against its clipped value), so a group that shares nothing with the outlier
is held to its normal bound, and its neighbours in the outlier's own group to
the bound of the clipped group.

Before the fix, on main: a -1e5 key in the ``int4`` preset made the other
tokens of its channel decode to about -45,000, NaN decoded to -480,774 (int8,
log8 scale), +inf to -inf (int8, bf16 scale), with NaN in the rest of the token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.kernels import quantize as kq
from kvjax.kernels.paged_attention import gather_dequantized
from kvjax import layout
from kvjax import quant
from kvjax.cache.attend import write_attend
from kvjax.layout.spec import QuantSpec


def _unique_specs():
  """Every quantized spec of the presets (window and sink dropped: quantizing ignores
  them), then plain int8 / int4 / int2 / fp8 with bf16, f16 and log8 scales."""
  out = {}
  for name, pair in layout.PRESETS.items():
    for which, s in zip("KV", pair):
      if s.is_quantized:
        base = QuantSpec(**{**s.__dict__, "residual": 0, "sink": 0})
        out.setdefault(base, f"{name}-{which}")
  plain = {"int8": QuantSpec(bits=8), "int8-log8": QuantSpec(bits=8, scale_dtype="log8"),
           "int8-f16": QuantSpec(bits=8, scale_dtype="float16"),
           "int4": QuantSpec(bits=4), "int4-asym-f16": QuantSpec(bits=4, symmetric=False,
                                                                 scale_dtype="float16"),
           "int2-log8": QuantSpec(bits=2, scale_dtype="log8"),
           "fp8": QuantSpec(bits=8, kind="fp8"),
           "fp8-log8": QuantSpec(bits=8, kind="fp8", scale_dtype="log8")}
  for name, s in plain.items():
    out.setdefault(s, name)
  return {name: s for s, name in out.items()}


SPECS = _unique_specs()
EXTREMES = {"+1e5": 1e5, "-1e5": -1e5, "+3e38": 3e38, "-3e38": -3e38, "nan": np.nan,
            "+inf": np.inf, "-inf": -np.inf}
P, S, H, D = 2, 16, 2, 64
AT = (1, 5, 0, 3)            # page, token, head, channel of the single outlier


def _data(seed=0):
  x = np.random.default_rng(seed).standard_normal((P, S, H, D)).astype(np.float32)
  x[..., 7] += 6.0           # an offset channel, as keys have
  return x


# ----------------------------------------------------------------------------- numpy model


def _step_up(spec):
  """The most a stored scale exceeds the exact one (encodings round up)."""
  return {"log8": 2.0 ** (1 / 8), "bfloat16": 1 + 2.0 ** -7, "float16": 1 + 2.0 ** -10}[
      spec.scale_dtype]


def _error_in_steps(spec):
  """The documented error bound in units of the scale."""
  if spec.kind == "fp8":
    return 448 * 2.0 ** -4
  if spec.levels is not None:
    q = (1 << spec.bits) - 1
    lc = [q * v for v in spec.levels]
    return max(lc[0], q - lc[-1], *((b - a) / 2 for a, b in zip(lc, lc[1:])))
  return 0.5


def _groups(x, spec):
  """float64 view of x [P, S, H, D] as groups, and the reduce axis."""
  g = spec.group(head_dim=x.shape[-1], page_size=x.shape[1])
  p, s, h, d = x.shape
  if spec.axis == "token":
    return x.reshape(p, s, h, d // g, g), 4
  return x.reshape(p, s // g, g, h, d), 2


def reference_bound(x, spec):
  """float64 [P, S, H, D]: the error bound of each element's group, from the documented
  formulas, for x with its values clipped to +-max_abs and its NaN as 0."""
  r = quant.max_abs(spec)
  xg, ax = _groups(np.asarray(x, np.float64), spec)
  xc = np.clip(np.where(np.isnan(xg), 0.0, xg), -r, r)
  amax = np.max(np.abs(xc), axis=ax, keepdims=True)
  lo = np.min(xc, axis=ax, keepdims=True)
  hi = np.max(xc, axis=ax, keepdims=True)
  q = (1 << spec.bits) - 1
  if spec.kind == "fp8":
    s = amax / 448
  elif spec.symmetric:
    s = amax / ((1 << (spec.bits - 1)) - 1)
  elif spec.zero_is_min:      # the stored minimum is at most u (relative) below the true one
    u = 2.0 ** -7 if spec.zero_dtype == "bfloat16" else 2.0 ** -10
    s = (hi - (lo - np.abs(lo) * u - 2.0 ** -24)) / q
  else:
    s = np.maximum((hi - lo) / (q - 0.5), np.abs(lo) / 127)
  s = s * _step_up(spec)
  if spec.scale_dtype == "log8":
    s = np.maximum(s, 2.0 ** -20)      # the smallest log8 scale
  bound = s * _error_in_steps(spec) + 2.0 ** -20 * amax + 1e-30   # float32 arithmetic
  return np.broadcast_to(bound, xg.shape).reshape(x.shape)


def expected_value(x, spec):
  """float64 [P, S, H, D]: what each element should decode to (within its bound): itself
  clipped to the range; a NaN: 0."""
  r = quant.max_abs(spec)
  return np.clip(np.where(np.isnan(x), 0.0, np.asarray(x, np.float64)), -r, r)


def check_decoded(got, x_clean, x_bad, spec):
  """Every element within its bound; nothing non-finite or beyond the range."""
  got = np.asarray(got, np.float64)
  bound = reference_bound(x_bad, spec)
  want = np.where(np.isnan(x_bad) | (x_bad != x_clean), expected_value(x_bad, spec), x_clean)
  err = np.abs(got - want)
  bad = ~(err <= bound)
  assert not bad.any(), (f"{int(bad.sum())} elements off, first at "
                         f"{np.argwhere(bad)[0].tolist()}: got {got[bad][:3]}, want "
                         f"{want[bad][:3]}, bound {bound[bad][:3]}")
  assert np.all(np.isfinite(got))
  assert np.all(np.abs(got) <= quant.max_abs(spec) + bound)


@functools.lru_cache(maxsize=None)
def _roundtrip(spec):
  return jax.jit(lambda a: quant.dequantize_pages(quant.quantize_pages(a, spec), spec))


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("value", list(EXTREMES), ids=str)
@pytest.mark.parametrize("name", list(SPECS))
def test_extreme_value_stays_in_its_group(name, value):
  spec = SPECS[name]
  x = _data()
  bad = x.copy()
  bad[AT] = EXTREMES[value]
  got = np.asarray(_roundtrip(spec)(jnp.asarray(bad)))
  check_decoded(got, x, bad, spec)
  # groups that do not hold the outlier: bit for bit as without it
  clean = np.asarray(_roundtrip(spec)(jnp.asarray(x)))
  mine = np.zeros(x.shape, bool)
  mine[AT] = True
  mg, ax = _groups(mine, spec)
  in_group = np.broadcast_to(mg.any(axis=ax, keepdims=True), mg.shape).reshape(x.shape)
  np.testing.assert_array_equal(got[~in_group], clean[~in_group])


@pytest.mark.parametrize("name", list(SPECS))
def test_range_is_kept(name):
  """A group reaching exactly +-max_abs (and one far off 0 on one side) is stored
  within its bound and not flagged: the range is a promise, not a guess."""
  spec = SPECS[name]
  r = np.float32(quant.max_abs(spec))
  x = np.clip(_data(1) * np.float32(r / 8), -r, r)
  x[0, 0, 0, :] = r                 # token groups at the top, the channel groups too
  x[0, 1, 0, :] = -r
  x[1, :, 1, :] = np.clip(r - np.abs(x[1, :, 1, :]), -r, r)   # all near +r
  got = np.asarray(_roundtrip(spec)(jnp.asarray(x)))
  check_decoded(got, x, x, spec)
  assert not np.asarray(quant.out_of_range(jnp.asarray(x), spec)).any()


def _documented_range(spec):
  """max_abs written from docs/quantization.md, without its 2**-10 margin."""
  smax = {"log8": 2.0 ** (95 / 8), "bfloat16": float(jnp.finfo(jnp.bfloat16).max),
          "float16": 65504.0}[spec.scale_dtype]
  q = (1 << spec.bits) - 1
  if spec.kind == "fp8":
    r = 448 * smax
  elif spec.symmetric:
    r = ((1 << (spec.bits - 1)) - 1) * smax
  elif spec.zero_is_min:
    r = q * smax / (2 + (2.0 ** -7 if spec.zero_dtype == "bfloat16" else 2.0 ** -10))
  else:
    r = min((q - 0.5) * smax / 2, 127 * smax)
  r = min(r, 2.0 ** 126)
  return min(r, 65504.0) if spec.zero_dtype == "float16" else r


@pytest.mark.parametrize("name", list(SPECS))
def test_max_abs_is_the_documented_range(name):
  spec = SPECS[name]
  r, doc = quant.max_abs(spec), _documented_range(spec)
  assert doc * (1 - 2.0 ** -9) <= r <= doc
  assert float(np.float32(r)) == r


def test_max_abs_of_some_presets():
  # the numbers docs/quantization.md quotes
  k, v = layout.PRESETS["int4"]
  assert round(quant.max_abs(k)) == 27205 and round(quant.max_abs(v)) == 26267
  k, v = layout.PRESETS["int2-nuq-r128-s1"]
  assert round(quant.max_abs(k)) == 5607 and round(quant.max_abs(v)) == 4690
  assert quant.max_abs(layout.PRESETS["int2-kf16-r128-s4"][0]) == 65504.0
  assert quant.max_abs(layout.PRESETS["int8"][0]) == 2.0 ** 126
  assert quant.max_abs(QuantSpec()) == float(jnp.finfo(jnp.bfloat16).max)
  assert quant.max_abs(QuantSpec(), "float16") == 65504.0


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("value", list(EXTREMES), ids=str)
@pytest.mark.parametrize("name", ["bf16"] + list(SPECS))
def test_out_of_range_flags_exactly_the_outlier_token(name, value):
  spec = QuantSpec() if name == "bf16" else SPECS[name]
  bad = _data()
  v = np.float32(EXTREMES[value])
  bad[AT] = v
  flags = np.asarray(jax.jit(quant.out_of_range, static_argnums=1)(jnp.asarray(bad), spec))
  assert flags.shape == (P, S)
  want = np.zeros((P, S), bool)
  want[AT[:2]] = not (abs(v) <= quant.max_abs(spec))     # nan: not <=
  np.testing.assert_array_equal(flags, want)
  nf = np.zeros((P, S), bool)
  nf[AT[:2]] = not np.isfinite(v)
  np.testing.assert_array_equal(np.asarray(quant.non_finite(jnp.asarray(bad))), nf)


def test_out_of_range_any_leading_axes_and_dtypes():
  spec = layout.PRESETS["int4"][1]                  # int4 per token, log8: range 26,267
  x = jnp.zeros((2, 3, 4, 2, 8), jnp.bfloat16)     # [B, T, ...] leading axes
  x = x.at[1, 2, 3, 1, 5].set(3e4).at[0, 0, 0, 0, 0].set(2.6e4)
  flags = quant.out_of_range(x, spec)
  assert flags.shape == (2, 3, 4) and flags.tolist() == np.eye(1, 24, 23, dtype=bool).reshape(
      2, 3, 4).tolist()
  with pytest.raises(ValueError):
    quant.out_of_range(jnp.zeros(4), spec)


# ----------------------------------------------------------------------------- kernels


def _several_extremes(seed=2):
  """x [1, S, H, D] with every extreme once, each in its own token and channel (so in
  its own group on either axis), and the clean data."""
  x = _data(seed)[:1]
  bad = x.copy()
  for i, v in enumerate(EXTREMES.values()):
    bad[0, 2 * i + 1, i % H, 5 * i + 2] = v
  return x, bad


@pytest.mark.parametrize("name", list(SPECS))
def test_kernel_clips_as_the_reference(name):
  spec = SPECS[name]
  x, bad = _several_extremes()
  got = kq.quantize_pages(jnp.asarray(bad), spec, interpret=True)
  want = quant.quantize_pages(jnp.asarray(bad), spec)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))), got, want)
  check_decoded(quant.dequantize_pages(got, spec), x, bad, spec)
  want_flags = np.zeros((1, S), bool)
  want_flags[0, [2 * i + 1 for i, v in enumerate(EXTREMES.values())
                 if not abs(v) <= quant.max_abs(spec)]] = True
  np.testing.assert_array_equal(np.asarray(quant.out_of_range(jnp.asarray(bad), spec)),
                                want_flags)


# ----------------------------------------------------------------------------- the cache

# a window of one page for the 2-bit presets, so that a page folds within 8 tokens
CACHE_PRESETS = ["int8", "fp8", "int4", "int4-g32", "int2-nuq-r128-s1"]
PS, T = 4, 8                         # page size, prefill tokens per sequence
OUT_AT = (0, 2, 1, 3)                # sequence, token, head, channel of the outlier


def _cache_specs(name):
  return tuple(QuantSpec(**{**s.__dict__, "residual": min(s.residual, PS), "sink": 0})
               for s in layout.PRESETS[name])


def _layer(p):
  return jax.tree.map(lambda a: a[0], p)


@functools.lru_cache(maxsize=None)
def _cache_step(name):
  ks, vs = _cache_specs(name)
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=32, page_size=PS,
                          num_pages=12, max_seqs=2, max_pages_per_seq=4, key_quant=ks,
                          value_quant=vs, prefix_caching=False)

  @jax.jit
  def run(q, k, v):
    ids, toks = jnp.array([0, 1]), jnp.ones((2, T), jnp.int32)
    plan, st = kvjax.plan_step(kvjax.init(cfg), ids, toks, jnp.array([T, T]), config=cfg)
    kp, vp = _layer(st.k), _layer(st.v)
    out, k_l, v_l, _ = write_attend(q, k, v, kp, vp, plan)
    k_w = kvjax.write(kp, plan, k)                   # write alone: the same pages
    r = layout.residual_tokens(ks, vs)
    read = lambda pages, spec: gather_dequantized(   # noqa: E731
        pages, spec, plan.page_table, plan.kv_lens,
        None if pages.stage is None else pages.stage[plan.seq_ids], r)[:, :T]
    return out, read(k_l, ks), read(v_l, vs), read(k_w, ks)

  return run


@pytest.mark.parametrize("value", ["-1e5", "nan", "+inf"])
@pytest.mark.parametrize("name", CACHE_PRESETS)
def test_outlier_token_through_the_cache(name, value):
  """An outlier key and value in one token of sequence 0: the other sequence reads
  back and attends exactly as without it; sequence 0's other tokens read back
  within the bound of their (clipped) groups."""
  ks, vs = _cache_specs(name)
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, T, 4, 32)).astype(np.float32)
  k, v = (rng.standard_normal((2, T, 2, 32)).astype(np.float32) for _ in range(2))
  kb, vb = k.copy(), v.copy()
  kb[OUT_AT] = vb[OUT_AT] = EXTREMES[value]
  run = _cache_step(name)
  out0, k0, v0, _ = (np.asarray(a) for a in run(*map(jnp.asarray, (q, k, v))))
  out1, k1, v1, kw = (np.asarray(a) for a in run(*map(jnp.asarray, (q, kb, vb))))
  np.testing.assert_array_equal(kw, k1)
  for got, clean in ((k1, k0), (v1, v0)):
    np.testing.assert_array_equal(got[1], clean[1])       # the other sequence
  np.testing.assert_array_equal(out1[1], out0[1])
  flags = np.asarray(quant.out_of_range(jnp.asarray(kb), ks))
  clipped = not abs(EXTREMES[value]) <= quant.max_abs(ks)       # nan: not <=
  assert flags.tolist() == [[clipped and t == OUT_AT[1] for t in range(T)], [False] * T]
  # sequence 0, token by token as the cache holds it: the folded pages quantized,
  # the window in full precision (rounded to the cache's float32: exact)
  r = layout.residual_tokens(ks, vs)
  folded = max(T - r, 0) // PS * PS
  for got, x, xb, spec in ((k1, k, kb, ks), (v1, v, vb, vs)):
    pages = lambda a: a[0, :folded].reshape(-1, PS, 2, 32)   # noqa: E731
    if folded:
      check_decoded(pages(got), pages(x), pages(xb), spec)
    np.testing.assert_array_equal(got[0, folded:], xb[0, folded:])
  assert folded > OUT_AT[1]           # the outlier's page is quantized, not in the window
