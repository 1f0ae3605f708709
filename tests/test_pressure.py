"""Pressure levels and evict-ahead counts against a plain-Python reading of the rules."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import pressure
from kvjax import cache
from kvjax import quant


def py_level(occ, total, thresholds):
  return sum(occ * 100 >= round(t * 100) * total for t in thresholds)


def py_evict(occ, total, cfg):
  lv = py_level(occ, total, cfg.thresholds)
  if lv == 0:
    return 0
  keep = math.floor(cfg.targets[lv - 1] * total + 1e-4)
  need = max(occ - keep, 0)
  return min(-(-need // cfg.batch) * cfg.batch, occ)


@pytest.mark.parametrize("cfg", [pressure.DEVICE, pressure.HOST,
                                 pressure.PressureConfig((0.5, 0.6, 0.99), (0.4, 0.5, 0.9), 3)])
def test_levels_and_evict_ahead_match_python(cfg):
  lv = jax.jit(pressure.level, static_argnums=2)
  ev = jax.jit(pressure.evict_ahead, static_argnums=2)
  for total in (100, 640):
    for occ in range(total + 1):
      assert int(lv(occ, total, cfg)) == py_level(occ, total, cfg.thresholds), (occ, total)
      assert int(ev(occ, total, cfg)) == py_evict(occ, total, cfg), (occ, total)


def test_device_defaults_are_70_85_95():
  assert [pressure.level_name(pressure.level(n, 1000)) for n in (699, 700, 850, 950)] == [
      "low", "medium", "high", "critical"]


def test_vmaps_over_pools():
  occ = jnp.array([10, 72, 90, 99])
  assert pressure.level(occ, 100).tolist() == [0, 1, 2, 3]
  assert jax.vmap(lambda o: pressure.evict_ahead(o, 100))(occ).tolist() == [
      py_evict(int(o), 100, pressure.DEVICE) for o in occ]


def test_requantize_from_high_by_default():
  assert [bool(pressure.wants_requantize(lv)) for lv in range(4)] == [False, False, True, True]


@pytest.mark.parametrize("kw,match", [
    (dict(thresholds=(0.9, 0.8, 0.95)), "thresholds"),
    (dict(thresholds=(0.7, 0.85, 1.2)), "thresholds"),
    (dict(targets=(0.75, 0.75, 0.85)), "targets"),
    (dict(batch=0), "batch"),
    (dict(requantize_from=7), "requantize_from"),
])
def test_bad_config_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    pressure.PressureConfig(**kw)


# ---------------------------------------------------------------- relieve (in the cache)




@functools.lru_cache(maxsize=None)
def _filled_cache(num_pages=24, page_size=2, prompts=((0, 9), (1, 7), (2, 5)), key_quant=None):
  """Sequences of the given (slot, pages) prefilled with distinct tokens, random K/V, then
  released except the last, so some pages are cached and some held (asserted: a refused
  prompt would leave nothing held and the tests below would check nothing)."""
  kw = {} if key_quant is None else {"key_quant": key_quant}
  cfg = kvjax.CacheConfig(num_layers=2, num_kv_heads=1, head_dim=8, page_size=page_size,
                          num_pages=num_pages, max_seqs=4, max_pages_per_seq=10, **kw)
  st = kvjax.init(cfg)
  plan = jax.jit(functools.partial(kvjax.plan_step, config=cfg))
  t = max(n for _, n in prompts) * page_size  # one shape: one compilation
  for i, (sid, n) in enumerate(prompts):
    toks = jnp.arange(t)[None] + 1000 * (i + 1)
    _, st = plan(st, jnp.array([sid]), toks, jnp.array([n * page_size]))
  rng = np.random.default_rng(0)
  for name in ("k", "v"):
    pages = getattr(st, name)
    data = jnp.asarray(rng.normal(size=pages.data.shape), pages.data.dtype) \
        if not pages.spec.is_quantized else pages.data
    st = st.replace(**{name: pages.replace(data=data)})
  assert int(st.status) == 0, kvjax.status_names(st.status)
  assert [int(st.seq_lens[s]) for s, _ in prompts] == [n * page_size for _, n in prompts]
  st = jax.jit(functools.partial(kvjax.release, config=cfg))(
      st, jnp.array([s for s, _ in prompts[:-1]]))
  held = int(jnp.sum(st.meta.ref_count > 0))
  cached = int(jnp.sum(jnp.any(st.meta.block_hash != 0, axis=-1) & (st.meta.ref_count == 0)))
  assert held == prompts[-1][1] and cached == sum(n for _, n in prompts[:-1]), (held, cached)
  return cfg, st


@functools.lru_cache(maxsize=None)
def relieve(cfg, cfg_p=pressure.DEVICE, demote_to=None):
  """``pressure.relieve`` jitted once per (config, pressure config, demotion specs)."""
  return jax.jit(functools.partial(pressure.relieve, config=cfg, pressure=cfg_p,
                                   demote_to=demote_to))


def py_relieve(meta, scores, total, cfg):
  """Plain-Python reading of the rule: occupancy, how many, and which pages go."""
  cached = [bool(h.any()) and r == 0 for h, r in zip(meta.block_hash, meta.ref_count)]
  occ = sum(bool(h.any()) or r > 0 for h, r in zip(meta.block_hash, meta.ref_count))
  n = py_evict(occ, total, cfg)
  order = sorted((p for p in range(total) if cached[p]), key=lambda p: (-scores[p], p))
  return occ, order[:n]


@pytest.mark.parametrize("cfg_p", [pressure.PressureConfig(batch=1), pressure.DEVICE,
                                   pressure.PressureConfig((0.3, 0.5, 0.9), (0.2, 0.4, 0.8), 2)])
def test_relieve_evicts_the_policy_victims_down_to_target(cfg_p):
  cfg, st = _filled_cache()
  meta = jax.tree.map(np.asarray, st.meta)
  scores = np.asarray(cache.eviction_scores(st, st.clock, cfg))
  occ, victims = py_relieve(meta, scores, cfg.num_pages, cfg_p)
  relief, new = relieve(cfg, cfg_p)(st)
  got = [int(p) for p in relief.pages if p >= 0]
  assert sorted(got) == sorted(victims) and int(relief.evicted) == len(victims)
  assert int(relief.level) == py_level(occ, cfg.num_pages, cfg_p.thresholds)
  held = np.asarray(st.meta.ref_count) > 0
  assert held.any() and victims, "the fixture must hold pages and be under pressure"
  assert (np.asarray(new.meta.ref_count) == np.asarray(st.meta.ref_count)).all()
  assert not held[got].any(), "a page held by a live sequence was evicted"
  assert int(pressure.occupancy(new)) == occ - int(relief.freed)
  assert int(new.stats.evictions) == int(st.stats.evictions) + len(victims)
  for p in got:  # freed: unhashed, empty
    assert not np.asarray(new.meta.block_hash[p]).any() and int(new.meta.filled[p]) == 0
  # the next allocations find free pages and evict nothing
  if victims:
    _, after = jax.jit(functools.partial(kvjax.plan_step, config=cfg))(
        new, jnp.array([3]), jnp.arange(2)[None] + 7, jnp.array([2]))
    assert int(after.stats.evictions) == int(new.stats.evictions)


def test_relieve_at_low_pressure_changes_nothing():
  cfg, st = _filled_cache(num_pages=40)
  relief, new = relieve(cfg)(st)
  assert int(relief.level) == 0 and int(relief.evicted) == 0 and (relief.pages == -1).all()
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(new)):
    assert (np.asarray(a) == np.asarray(b)).all()


def test_evicted_prefix_is_no_longer_matched():
  cfg, st = _filled_cache()
  prompt = jnp.arange(9 * 2)[None] + 1000  # the first released prompt
  attach = jax.jit(functools.partial(kvjax.attach_prefix, config=cfg))
  cached_before, attached = attach(st, jnp.array([3]), prompt, jnp.array([18]))
  # all of its pages but the last (one token is always left to compute)
  assert int(cached_before[0]) == 8 * 2
  chain = np.asarray(attached.page_table[3])[:8].tolist()
  relief, new = relieve(cfg, pressure.PressureConfig(batch=1))(st)
  cached_after, _ = attach(new, jnp.array([3]), prompt, jnp.array([18]))
  victims = set(int(p) for p in relief.pages if p >= 0)
  # the match stops at the first evicted page of the chain (its children are orphaned)
  first = next((i for i, p in enumerate(chain) if p in victims), len(chain))
  assert first < len(chain), "the oldest chain (LRU) must lose a page"
  assert int(cached_after[0]) == first * 2


def test_demotion_returns_victims_requantized():
  cfg, st = _filled_cache()
  to = (kvjax.QuantSpec(bits=4, axis="channel", symmetric=False),
        kvjax.QuantSpec(bits=4))
  strict = pressure.PressureConfig(batch=1, requantize_from=pressure.MEDIUM)
  relief, _ = relieve(cfg, strict, to)(st)
  got = np.asarray(relief.pages)
  meta = jax.tree.map(np.asarray, st.meta)
  scores = np.asarray(cache.eviction_scores(st, st.clock, cfg))
  _, victims = py_relieve(meta, scores, cfg.num_pages, strict)
  assert victims and sorted(got[got >= 0].tolist()) == sorted(victims)
  for spec, pages, out in ((to[0], st.k, relief.k), (to[1], st.v, relief.v)):
    ref = np.asarray(pages.data, np.float32)[:, got[got >= 0]]       # [L, n, S, H, D]
    deq = np.asarray(quant.dequantize_pages(out, spec), np.float32)[:, got >= 0]
    err = np.linalg.norm(deq - ref) / np.linalg.norm(ref)
    assert err < 0.15, err                                        # 4-bit codes of N(0, 1)
    assert np.abs(np.asarray(out.data)[:, got < 0]).max(initial=0) == 0
  never = pressure.PressureConfig(batch=1, requantize_from=4)
  relief, _ = relieve(cfg, never, to)(st)
  assert int(relief.evicted) > 0 and not np.asarray(relief.k.data).any()


def test_relieve_bad_arguments_raise():
  cfg, st = _filled_cache()
  with pytest.raises(ValueError, match="limit"):
    pressure.relieve(st, config=cfg, limit=0)
  with pytest.raises(ValueError, match="demote_to"):
    pressure.relieve(st, config=cfg, demote_to=(kvjax.QuantSpec(bits=4),))
  with pytest.raises(ValueError, match="total"):
    pressure.max_evict(0)
