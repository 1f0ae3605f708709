"""The per-layer API: ``write`` then ``attend`` is ``write_attend``, for every preset.

Layer 1 of two, two sequences: two prefill chunks (the second folds pages whose
ring slots it reuses) and decode steps, through ``layer_pages`` /
``with_layer_pages``, and through the in-place view the model's step takes
(``flat_layer`` with ``layer_plan``). For every spec of
``kvjax.layout.PRESETS`` (windows shrunk to two pages so that pages fold), the
three paths give the same bits (outputs and every array of the cache, so the
view writes nothing into layer 0), and they track a float64 dense causal
attention over the float K/V within the spec's tolerance.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import layout
from kvjax.cache.plan import layer_plan
from kvjax.layout.pages import scatter_rows
from kvjax.layout.spec import QuantSpec

S, H, HQ, D = 4, 2, 4, 32        # page size, kv heads, query heads, head_dim (int4-g32: D >= 32)
R = 2 * S                        # the staged presets' window, shrunk so that pages fold
STEPS = ((8, (8, 5)), (8, (8, 8)), (1, (1, 1)), (1, (1, 1)), (1, (1, 0)))   # (T, num_new)

# Relative error of the outputs (all steps, valid tokens) against float attention, by
# the bits of the coarser spec: random Gaussian K/V, D = 32. Measured: 8e-8 (the bf16
# preset: unquantized float32 pages), int8 0.0063, fp8 0.028, int4 0.061-0.074, int2
# 0.046-0.13 (four sink tokens: the low end); the bounds leave ~1.6-2x.
TOL = {16: 1e-5, 8: 0.01, 4: 0.12, 2: 0.25}
FP8_TOL = 0.05


def _window(spec):
  return dataclasses.replace(spec, residual=R) if spec.residual else spec


def _config(name):
  ks, vs = (_window(s) for s in layout.PRESETS[name])
  return kvjax.CacheConfig(num_layers=2, num_kv_heads=H, head_dim=D, page_size=S,
                           num_pages=16, max_seqs=2, max_pages_per_seq=6, key_quant=ks,
                           value_quant=vs, prefix_caching=False)


def _tol(name):
  ks, vs = layout.PRESETS[name]
  if "fp8" in (ks.kind, vs.kind):
    return FP8_TOL
  return TOL[min(ks.bits, vs.bits)]


_plan = jax.jit(functools.partial(kvjax.plan_step, config=_config("bf16")))


@functools.lru_cache(maxsize=None)
def _plans():
  """The plans of ``STEPS`` (geometry only: the same for every spec) and the step data."""
  rng = np.random.default_rng(0)
  state, out = kvjax.init(_config("bf16")), []
  for t, num_new in STEPS:
    plan, state = _plan(state, jnp.arange(2), jnp.zeros((2, t), jnp.int32), jnp.array(num_new))
    data = tuple(jnp.asarray(rng.standard_normal((2, t, h, D)), jnp.float32)
                 for h in (HQ, H, H))
    out.append((plan, data))
  return out


def _float_reference(steps):
  """float64 [B, T, Hq, D] per step: causal attention over every token written so far."""
  g = HQ // H
  hist_k, hist_v = [np.zeros((0, H, D))] * 2, [np.zeros((0, H, D))] * 2
  outs = []
  for plan, (q, k, v) in steps:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    valid = np.asarray(plan.valid)
    out = np.zeros(q.shape)
    for b in range(2):
      n = int(valid[b].sum())
      hist_k[b] = np.concatenate([hist_k[b], k[b, :n]])
      hist_v[b] = np.concatenate([hist_v[b], v[b, :n]])
      start = len(hist_k[b]) - n
      for i in range(n):
        for hh in range(HQ):
          s = hist_k[b][:start + i + 1, hh // g] @ q[b, i, hh] / np.sqrt(D)
          w = np.exp(s - s.max())
          out[b, i, hh] = (w / w.sum()) @ hist_v[b][:start + i + 1, hh // g]
    outs.append(out)
  return outs


@functools.partial(jax.jit, static_argnames="cfg")
def _step(state, flat_state, plan, q, k, v, *, cfg):
  """One step through the three paths: their outputs and states after it."""
  if layout.needs_staging(cfg.key_quant, cfg.value_quant):
    plan = plan.replace(fold_floor=jnp.zeros((2,), jnp.int32))
  k_l, v_l = kvjax.layer_pages(state, 1)
  k_w, v_w = kvjax.write(k_l, plan, k), kvjax.write(v_l, plan, v)
  out_a = kvjax.attend(q, k_w, v_w, plan).out
  res = kvjax.write_attend(q, k, v, k_l, v_l, plan)
  i = jnp.int32(1)                                                  # traced, as in the scan
  lplan = layer_plan(plan, i, flat_state.k)
  k_f, v_f = layout.flat_layer(flat_state.k, i), layout.flat_layer(flat_state.v, i)
  res_f = kvjax.write_attend(q, k, v, k_f, v_f, lplan)
  flat_state = flat_state.replace(k=layout.with_flat_layer(flat_state.k, i, res_f.k_pages),
                                  v=layout.with_flat_layer(flat_state.v, i, res_f.v_pages))
  return (out_a, res.out, res_f.out, kvjax.with_layer_pages(state, 1, k_w, v_w),
          kvjax.with_layer_pages(state, 1, res.k_pages, res.v_pages), flat_state)


@pytest.mark.parametrize("name", list(layout.PRESETS))
def test_write_then_attend_is_write_attend_and_tracks_float(name):
  cfg = _config(name)
  steps = _plans()
  want = _float_reference(steps)
  state = flat_state = kvjax.init(cfg)
  err, norm = 0.0, 0.0
  for (plan, (q, k, v)), ref in zip(steps, want):
    out_a, out_b, out_f, state_a, state, flat_state = _step(state, flat_state, plan, q, k, v,
                                                            cfg=cfg)
    out_a, out_b = np.asarray(out_a), np.asarray(out_b)
    np.testing.assert_array_equal(out_a, out_b)       # one path: the same bits
    np.testing.assert_array_equal(np.asarray(out_f), out_b)
    for a, b, f in zip(jax.tree.leaves((state_a.k, state_a.v)),
                       jax.tree.leaves((state.k, state.v)),
                       jax.tree.leaves((flat_state.k, flat_state.v))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      np.testing.assert_array_equal(np.asarray(f), np.asarray(b))
    assert state_a.k.written is None and state_a.k.ring_before is None
    valid = np.asarray(plan.valid)
    err += float(np.sum((out_a[valid] - ref[valid]) ** 2))
    norm += float(np.sum(ref[valid] ** 2))
  rel = np.sqrt(err / norm)
  assert rel < _tol(name), f"{name}: relative error {rel:.3g} against float attention"


def test_attend_on_a_staged_prefill_chunk_needs_the_pages_write_returned():
  cfg = _config("int4")
  plan, (q, k, v) = _plans()[0]
  plan = plan.replace(fold_floor=jnp.zeros((2,), jnp.int32))
  k_l, v_l = kvjax.layer_pages(kvjax.init(cfg), 1)
  attend = jax.jit(kvjax.attend)          # the checks run at trace time (eager is slow)
  with pytest.raises(ValueError, match="carries none"):
    attend(q, k_l, v_l, plan)             # pages as stored: the chunk's tokens are not there
  k_w, v_w = jax.jit(lambda k_l, v_l: (kvjax.write(k_l, plan, k), kvjax.write(v_l, plan, v)))(
      k_l, v_l)
  assert k_w.written.shape == (2, 8, H, D) and k_w.ring_before.shape[:2] == (2, 1)   # NS = 1
  with pytest.raises(ValueError, match="carries none"):
    attend(q, layout.as_stored(k_w), layout.as_stored(v_w), plan)


def test_layer_pages_round_trip_and_checks():
  cfg = kvjax.CacheConfig(num_layers=3, num_kv_heads=H, head_dim=8, page_size=S, num_pages=4,
                          max_seqs=2, max_pages_per_seq=2, key_quant=QuantSpec(bits=8),
                          value_quant=QuantSpec(bits=8))
  st = kvjax.init(cfg)
  k, v = kvjax.layer_pages(st, 2)
  assert k.data.shape == (4, S, H, 8) and k.spec == cfg.key_quant
  k2 = k.replace(scale=k.scale + 1)
  st2 = jax.jit(kvjax.with_layer_pages)(st, jnp.int32(2), k2, v)    # i may be traced
  np.testing.assert_array_equal(np.asarray(st2.k.scale[2]), np.asarray(k2.scale))
  np.testing.assert_array_equal(np.asarray(st2.k.scale[:2]), np.asarray(st.k.scale[:2]))
  with pytest.raises(ValueError, match="layout"):
    kvjax.with_layer_pages(st, 0, k.replace(spec=QuantSpec(bits=4)), v)
  with pytest.raises(ValueError, match="does not fit"):
    kvjax.with_layer_pages(st, 0, k.replace(scale=k.scale[:1]), v)
  # a state that kept write's step fields is refused by the operations
  staged = _config("int4")
  plan, (_, kk, vv) = _plans()[0]
  plan = plan.replace(fold_floor=jnp.zeros((2,), jnp.int32))
  s0 = kvjax.init(staged)
  k_w = jax.jit(lambda k_l: kvjax.write(k_l, plan, kk))(kvjax.layer_pages(s0, 0)[0])
  bad = s0.replace(k=jax.tree.map(lambda a: jnp.stack([a, a]), k_w))
  with pytest.raises(ValueError, match="with_layer_pages"):
    kvjax.release(bad, jnp.array([0]), config=staged)


def test_flat_layer_view_and_layer_plan_checks():
  cfg = kvjax.CacheConfig(num_layers=3, num_kv_heads=H, head_dim=8, page_size=S, num_pages=4,
                          max_seqs=2, max_pages_per_seq=2)
  st = kvjax.init(cfg)
  view = layout.flat_layer(st.k, 2)
  assert view.data.shape == (12, S, H, 8)
  with pytest.raises(ValueError, match="does not fit"):
    layout.with_flat_layer(st.k, 2, view.replace(data=view.data[:4]))
  with pytest.raises(ValueError, match="all layers"):
    layout.flat_layer(view, 0)
  # "none" entries stay out of range of the whole view; real ids move to layer i's range
  plan, _ = kvjax.plan_step(st, jnp.array([0, -1]), jnp.zeros((2, 1), jnp.int32),
                            jnp.array([1, 0]), config=cfg)
  lp = layer_plan(plan, 2, st.k)
  np.testing.assert_array_equal(np.asarray(lp.page_table),
                                np.where(np.asarray(plan.page_table) >= 0,
                                         np.asarray(plan.page_table) + 8, -1))
  assert int(lp.slots[0, 0]) == int(plan.slots[0, 0]) + 8 * S
  assert int(lp.slots[1, 0]) == 3 * 4 * S             # padding row: past the whole view
  assert lp.cow_dst.tolist() == [12, 12]              # no copy on write: past the whole view
  # a write through the view touches only layer 2's page
  k_view = kvjax.write(view, lp, jnp.ones((2, 1, H, 8)))
  k_all = layout.with_flat_layer(st.k, 2, k_view)
  touched = np.argwhere(np.asarray(k_all.data).any(axis=(2, 3, 4)))
  assert touched.tolist() == [[2, int(plan.page_table[0, 0])]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float8_e4m3fn"])
@pytest.mark.parametrize("idx", [[2], [0, 5, 2], [9, 1, 6]])   # one update; several; past the end
def test_scatter_rows_sets_bits_and_drops_out_of_range(dtype, idx):
  # against numpy assignment, bit for bit (NaN and inf included), jitted as the step uses it
  rng = np.random.default_rng(len(idx))
  a = rng.normal(size=(6, 3)).astype(np.float32)
  values = rng.normal(size=(len(idx), 3)).astype(np.float32)
  values[0, 0], values[-1, 1] = np.nan, -np.inf
  dt = jnp.dtype(dtype)
  a_dt, v_dt = np.asarray(jnp.asarray(a, dt)), np.asarray(jnp.asarray(values, dt))
  want = a_dt.copy()
  for i, v in zip(idx, v_dt):
    if 0 <= i < len(a):
      want[i] = v
  got = np.asarray(jax.jit(scatter_rows)(jnp.asarray(a_dt), jnp.asarray(idx), v_dt))
  assert got.dtype == dt
  np.testing.assert_array_equal(got.view(f"u{dt.itemsize}"), want.view(f"u{dt.itemsize}"))


def test_bfloat16_scatter_does_not_upcast_the_pool_on_cpu():
  # XLA:CPU has no bfloat16 scatter: a plain one is rewritten as a float32 scatter over the
  # whole array and back (a pool: every layer and step). scatter_rows moves bits instead.
  a = jnp.zeros((4096, 3, 64), jnp.bfloat16)
  hlo = jax.jit(scatter_rows).lower(a, jnp.array([5, 77]),
                                           jnp.ones((2, 3, 64))).compile().as_text()
  assert "f32[4096,3,64]" not in hlo
  if jax.default_backend() == "cpu":   # the guard is real: the plain scatter does upcast
    plain = jax.jit(lambda a, i, v: a.at[i].set(v.astype(a.dtype), mode="drop"))
    assert "f32[4096,3,64]" in plain.lower(a, jnp.array([5, 77]),
                                           jnp.ones((2, 3, 64))).compile().as_text()
