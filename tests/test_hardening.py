"""Regression tests of the hardening issue: refusals, namespaces, checked mode, types.

Each test failed on ``008bf6b`` (the issue's main): the note in each says how.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import drop
from kvjax import pressure
from kvjax.models import llama
from kvjax.models.generate import generate
from kvjax.models.generate import prefill

CFG = llama.LlamaConfig.small()
# 6 pages of 4 tokens: two short rows fit, a third long prompt runs the pool dry.
SMALL = CFG.cache_config(page_size=4, num_pages=6, max_seqs=4, max_pages_per_seq=8)
SMALL_CHECKED = CFG.cache_config(page_size=4, num_pages=6, max_seqs=4, max_pages_per_seq=8,
                                 checked=True)
BIG = CFG.cache_config(page_size=4, num_pages=32, max_seqs=4, max_pages_per_seq=8)


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CFG, jax.random.key(0))


def _layer(p):
  """One layer's pages of all-layer ``Pages``."""
  return jax.tree.map(lambda a: a[0], p)


def _alone(params, prompt, n):
  """Reference: the prompt generated alone in a roomy cache (prefill chunk 64, prefill's
  default: the [1, 64] step test_prefill_refusal_raises_with_the_usable_state runs too)."""
  out, _ = generate(params, kvjax.init(BIG), [prompt], [0], config=CFG, cache_config=BIG,
                    max_new_tokens=n, stop_ids=(), chunk_size=64)
  return list(out[0])


# ------------------------------------------------------------------ refusals keep the cache


def test_generate_ends_out_of_pages_row_and_returns_the_others(params):
  # main: CacheStatusError raised after the donated step; the caller's cache was deleted.
  # rows 0 and 1 fit in one page each; row 2 (24 tokens, 6 pages) is refused at its third
  # prefill chunk, with 16 tokens cached
  prompts = [[1], [4], list(range(6, 30))]
  cache = kvjax.init(SMALL)
  out, cache = generate(params, cache, prompts, [0, 1, 2], config=CFG, cache_config=SMALL,
                        max_new_tokens=3, stop_ids=(), chunk_size=8)
  assert [o.finish_reason for o in out] == ["length", "length", "out_of_pages"]
  assert list(out[2]) == []                      # refused in prefill: nothing generated
  for r in (0, 1):
    assert list(out[r]) == _alone(params, prompts[r], 3), f"row {r}"
  lens = np.asarray(cache.seq_lens)              # usable: not deleted
  assert lens[:3].tolist() == [1 + 2, 1 + 2, 16]
  assert "OUT_OF_PAGES" in kvjax.flagged_rows(cache)[2]
  # the state is consistent: releasing everything frees every reference
  cache = kvjax.release(cache, jnp.array([0, 1, 2]), config=SMALL)
  assert int(cache.meta.ref_count.sum()) == 0


def test_prefill_refusal_raises_with_the_usable_state(params):
  prompts = [[1, 2, 3], list(range(6, 30))]      # 1 + 6 pages > 6
  with pytest.raises(kvjax.CacheStatusError) as err:
    prefill(params, kvjax.init(SMALL), prompts, [0, 1], config=CFG, cache_config=SMALL,
            chunk_size=8)
  e = err.value
  assert 1 in e.rows and "OUT_OF_PAGES" in e.rows[1] and 0 not in e.rows
  assert int(e.state.seq_lens[0]) == 3           # the other row was prefilled to the end
  assert np.isfinite(e.logits[0]).all() and np.isnan(e.logits[1]).all()
  want, _ = prefill(params, kvjax.init(BIG), prompts[:1], [0], config=CFG, cache_config=BIG)
  np.testing.assert_allclose(e.logits[0], want[0], atol=1e-5)


def test_checked_decode_step_raises_cache_status_error_and_keeps_the_state(params):
  # main: JaxRuntimeError (INTERNAL: CpuCallback error) and the donated cache deleted.
  cache = kvjax.init(SMALL_CHECKED)
  tokens = jnp.arange(1, 29, dtype=jnp.int32).reshape(1, 28)
  with pytest.raises(kvjax.CacheStatusError, match="seq 0: OUT_OF_PAGES") as err:
    llama.decode_step(params, cache, tokens, jnp.array([0]), jnp.array([28]), config=CFG,
                      cache_config=SMALL_CHECKED)
  state = kvjax.clear_status(err.value.state)
  assert int(state.seq_lens[0]) == 0 and int(state.meta.ref_count.sum()) == 0
  logits, state = llama.decode_step(params, state, tokens[:, :8], jnp.array([0]), jnp.array([8]),
                                    config=CFG, cache_config=SMALL_CHECKED)
  assert int(state.seq_lens[0]) == 8 and np.isfinite(np.asarray(logits)).all()


def test_checked_generate_raises_with_the_state(params):
  prompts = [[1, 2, 3], list(range(6, 30))]
  with pytest.raises(kvjax.CacheStatusError) as err:
    generate(params, kvjax.init(SMALL_CHECKED), prompts, [0, 1], config=CFG,
             cache_config=SMALL_CHECKED, max_new_tokens=2, chunk_size=8)
  assert err.value.rows == {1: ["OUT_OF_PAGES"]}
  assert int(err.value.state.seq_lens[0]) == 3 and int(err.value.state.seq_lens[1]) == 16


def test_non_finite_kv_is_flagged_for_its_sequence_only(params):
  # main: no flag at all; the NaN went into the cache silently.
  poison = CFG.vocab_size - 1
  # an inf in this token's embedding: RMSNorm makes its K/V NaN (and, the embedding being
  # tied, every row's logit of this token: that column is left out below)
  bad = params.replace(embed=params.embed.at[poison, 0].set(jnp.inf))
  tokens = jnp.array([[1, 2, 3], [5, poison, 6]], jnp.int32)
  ids, num = jnp.array([0, 1]), jnp.array([3, 3])
  got, cache = llama.decode_step(bad, kvjax.init(BIG), tokens, ids, num, config=CFG,
                                 cache_config=BIG)
  assert kvjax.flagged_rows(cache) == {1: ["NON_FINITE"]}
  want, _ = llama.decode_step(params, kvjax.init(BIG), tokens[:1], ids[:1], num[:1], config=CFG,
                              cache_config=BIG)
  np.testing.assert_allclose(np.asarray(got)[0, :, :poison], np.asarray(want)[0, :, :poison],
                             atol=1e-5)
  out, _ = generate(bad, kvjax.init(BIG), [[1, 2, 3], [5, poison, 6]], [0, 1], config=CFG,
                    cache_config=BIG, max_new_tokens=3, stop_ids=())
  assert out[1].finish_reason == "non_finite" and list(out[1]) == []


# ------------------------------------------------------------------ namespaces


# jitted once per config (eager calls of these ops dispatch every jnp op: slow)
_plan = jax.jit(kvjax.plan_step, static_argnames="config")
_attach = jax.jit(kvjax.attach_prefix, static_argnames="config")


def _kv_cfg(**kw):
  return kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=16,
                           max_seqs=3, max_pages_per_seq=6, **kw)


def test_stale_seed_never_indexes_another_tenants_pages():
  # main: the attach that matched nothing left seed_A in slot 0; B's pages planned into
  # slot 0 were indexed under A's namespace and a later attach with seed_A reused them.
  cfg = _kv_cfg()
  seed_a = kvjax.tenant_seed(cfg, tenant_salt="tenant-a")
  seed_b = kvjax.tenant_seed(cfg, tenant_salt="tenant-b")
  prompt = jnp.array([[11, 12, 13, 14, 15, 16, 17]])
  st = kvjax.init(cfg)
  cached, st = _attach(st, jnp.array([0]), prompt, jnp.array([7]), seed_a,
                                   config=cfg)
  assert int(cached[0]) == 0 and not np.asarray(st.seq_seed[0]).any()
  _, st = _plan(st, jnp.array([0]), prompt, jnp.array([7]), seed_b, config=cfg)
  assert (np.asarray(st.seq_seed[0]) == np.asarray(seed_b)).all()
  full = np.asarray(st.page_table[0])[:3]
  assert (np.asarray(st.meta.namespace)[full] == np.asarray(seed_b)).all()
  cached_a, _ = _attach(st, jnp.array([1]), prompt, jnp.array([7]), seed_a,
                                    config=cfg)
  cached_b, _ = _attach(st, jnp.array([1]), prompt, jnp.array([7]), seed_b,
                                    config=cfg)
  assert int(cached_a[0]) == 0 and int(cached_b[0]) == 6


def test_a_slot_cannot_be_continued_under_another_namespace():
  cfg = _kv_cfg()
  seed_a = kvjax.tenant_seed(cfg, tenant_salt="tenant-a")
  seed_b = kvjax.tenant_seed(cfg, tenant_salt="tenant-b")
  st = kvjax.init(cfg)
  _, st = _plan(st, jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]), seed_a,
                          config=cfg)
  plan, st2 = _plan(st, jnp.array([0]), jnp.array([[4]]), jnp.array([1]), seed_b,
                              config=cfg)
  assert bool(plan.refused[0]) and int(st2.seq_lens[0]) == 3
  assert kvjax.flagged_rows(st2) == {0: ["BAD_INPUT"]}
  plan, st3 = _plan(st, jnp.array([0]), jnp.array([[4]]), jnp.array([1]), seed_a,
                              config=cfg)
  assert not bool(plan.refused[0]) and int(st3.seq_lens[0]) == 4


# ------------------------------------------------------------------ checked mode everywhere


def test_release_flags_out_of_range_ids():
  # main: ignored silently.
  cfg = _kv_cfg()
  st = kvjax.release(kvjax.init(cfg), jnp.array([0, 7, -1]), config=cfg)
  assert kvjax.status_names(st.status) == ["BAD_INPUT"]
  st = kvjax.release(kvjax.init(cfg), jnp.array([-1, 2, 2]), config=cfg)   # padding, repeats
  assert int(st.status) == 0


@pytest.mark.parametrize("op", ["release", "fork"])
def test_ops_require_config(op):
  # main: config was optional, so fork/release could not honour checked mode.
  st = kvjax.init(_kv_cfg())
  with pytest.raises(TypeError, match="config"):
    if op == "release":
      kvjax.release(st, jnp.array([0]))
    else:
      kvjax.fork(st, jnp.array([0]), jnp.array([1]))


def test_every_op_honours_checked_mode():
  # main: release, relieve and drop_pages never raised; fork only with config given.
  cfg = _kv_cfg(checked=True)
  st = kvjax.init(cfg)
  with pytest.raises(kvjax.CacheStatusError, match="BAD_INPUT"):
    kvjax.release(st, jnp.array([9]), config=cfg)
  with pytest.raises(kvjax.CacheStatusError, match="BAD_INPUT"):
    kvjax.fork(st, jnp.array([0]), jnp.array([1]), config=cfg)    # source empty
  flagged = st.replace(status=jnp.int32(kvjax.OUT_OF_PAGES))
  with pytest.raises(kvjax.CacheStatusError):
    pressure.relieve(flagged, config=cfg)
  with pytest.raises(kvjax.CacheStatusError):
    drop.drop_pages(drop.enable(flagged), budget=3, sink_pages=1, recent_pages=1, config=cfg)
  with pytest.raises(kvjax.CacheStatusError):
    kvjax.attach_prefix(st, jnp.array([9]), jnp.array([[1, 2, 3]]), jnp.array([3]), config=cfg)


# ------------------------------------------------------------------ types


@pytest.mark.parametrize("dtype", [jnp.uint32, jnp.int16, jnp.uint8])
def test_seq_ids_of_any_integer_dtype(dtype):
  # main: uint32 ids refused every row with BAD_INPUT.
  cfg = _kv_cfg()
  plan, st = _plan(kvjax.init(cfg), jnp.array([0, 2], dtype),
                             jnp.array([[1, 2], [3, 4]], dtype), jnp.array([2, 1], dtype),
                             config=cfg)
  assert int(st.status) == 0 and st.seq_lens.tolist() == [2, 0, 1]
  assert plan.seq_ids.dtype == jnp.int32


def test_huge_unsigned_id_is_refused_not_wrapped():
  cfg = _kv_cfg()
  plan, st = _plan(kvjax.init(cfg), jnp.array([0, 2 ** 32 - 1], jnp.uint32),
                             jnp.array([[1], [2]], jnp.uint32), jnp.array([1, 1], jnp.uint32),
                             config=cfg)
  assert bool(plan.refused[1]) and kvjax.status_names(st.status) == ["BAD_INPUT"]
  assert st.seq_lens.tolist() == [1, 0, 0]


def test_plan_step_and_attach_with_x64():
  # main: TypeError inside lax.scan with jax_enable_x64 on.
  with jax.enable_x64(True):
    cfg = _kv_cfg()
    st = kvjax.init(cfg)
    plan, st = jax.jit(functools.partial(kvjax.plan_step, config=cfg))(
        st, jnp.array([0]), jnp.array([[1, 2, 3, 4, 5]]), jnp.array([5]))
    assert st.seq_lens.tolist() == [5, 0, 0] and int(st.status) == 0
    st = kvjax.release(st, jnp.array([0]), config=cfg)
    cached, st = kvjax.attach_prefix(st, jnp.array([1]), jnp.array([[1, 2, 3, 4, 5]]),
                                     jnp.array([5]), config=cfg)
    assert int(cached[0]) == 4


def test_attend_refuses_an_integer_query():
  # main: accepted, returned zeros.
  cfg = _kv_cfg()
  plan, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]),
                             config=cfg)
  with pytest.raises(ValueError, match="q must be floating"):
    kvjax.attend(jnp.ones((1, 1, 1, 2), jnp.int32), _layer(st.k), _layer(st.v), plan)


@pytest.mark.parametrize("kw, match", [
    (dict(key_rope=float("nan")), "key_rope"),
    (dict(key_rope=float("inf")), "key_rope"),
    (dict(checked="no"), "checked"),
    (dict(prefix_caching=1), "prefix_caching"),
])
def test_config_rejects_bad_values(kw, match):
  # main: key_rope=nan accepted (every output NaN), checked="no" counted as true.
  with pytest.raises(ValueError, match=match):
    _kv_cfg(**kw)


def test_bad_seeds_shape_is_a_value_error():
  cfg = _kv_cfg()
  with pytest.raises(ValueError, match="seeds"):
    kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1]]), jnp.array([1]),
                    jnp.zeros((3,), jnp.uint32), config=cfg)


# ------------------------------------------------------------------ flags of what is written


@pytest.mark.parametrize("spec, dtype, big", [
    (kvjax.QuantSpec(bits=4, scale_dtype="log8"), "float32", 1e5),     # clipped to ~2.6e4
    (kvjax.QuantSpec(), "bfloat16", 3.4e38),                            # bf16 overflows to inf
])
def test_write_flags_out_of_range_and_non_finite(spec, dtype, big):
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=32, page_size=2, num_pages=8,
                          max_seqs=4, max_pages_per_seq=2, dtype=dtype, key_quant=spec)
  plan, st = kvjax.plan_step(kvjax.init(cfg), jnp.array([0, 1, 2, 3]),
                             jnp.ones((4, 2), jnp.int32), jnp.array([2, 2, 2, 1]), config=cfg)
  k = jnp.ones((4, 2, 1, 32), jnp.float32)
  k = k.at[1, 0, 0, 3].set(big).at[2, 1, 0, 0].set(jnp.nan)
  k = k.at[3, 1, 0, 0].set(jnp.nan)          # row 3's second token is padding: not written
  flags = kvjax.write_flags(plan, k, jnp.ones_like(k), _layer(st.k), _layer(st.v))
  assert flags.tolist() == [0, kvjax.OUT_OF_RANGE, kvjax.NON_FINITE, 0]
  st = kvjax.flag_sequences(st, plan.seq_ids, flags)
  assert kvjax.flagged_rows(st) == {1: ["OUT_OF_RANGE"], 2: ["NON_FINITE"]}
