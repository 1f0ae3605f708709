"""The integration path the cache will take: prefill, then decode steps that write
through the staging ring and attend over quantized pages, in one jitted step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.kernels import ops
from kvjax.kernels.paged_attention import paged_attention_reference
from kvjax import layout
from kvjax import quant
from kvjax.layout.pages import Pages
from kvjax.layout.spec import QuantSpec

S, H, HQ, D, M = 4, 2, 4, 16, 5


def _step_impl(k_pool, v_pool, k_stage, v_stage, table, lens, k_new, v_new, num_new, q, *, k_spec,
          v_spec):
  r = layout.residual_tokens(k_spec, v_spec)
  k_pool, k_stage = quant.stage_and_fold(k_pool, k_stage, table, lens, k_new, num_new, k_spec,
                                         residual=r)
  v_pool, v_stage = quant.stage_and_fold(v_pool, v_stage, table, lens, v_new, num_new, v_spec,
                                         residual=r)
  out = ops.paged_attention(q, k_pool, v_pool, table, lens + num_new, k_spec, v_spec,
                            k_stage=k_stage, v_stage=v_stage, pallas=False)
  return k_pool, v_pool, k_stage, v_stage, out


@pytest.mark.parametrize("preset, tol", [
    # relative error of the attention output after the last step, float K/V as truth;
    # int8: step ~1/127 of a token's range; int2 (Gaussian data, 3 levels + zero point)
    # with an 8-token window over 12..16 tokens: half the tokens exact
    ("int8", 0.02), ("int2-r64", 0.5)])
def test_decode_steps_compile_once_and_track_float(preset, tol):
  k_spec, v_spec = layout.PRESETS[preset]
  if k_spec.residual:   # a window of 2 pages at this page size
    k_spec, v_spec = (QuantSpec(**{**s.__dict__, "residual": 2 * S}) for s in (k_spec, v_spec))
  rng = np.random.default_rng(0)
  b, n_total = 2, S * M
  kf = jnp.asarray(rng.standard_normal((b, n_total, H, D)), jnp.float32)
  vf = jnp.asarray(rng.standard_normal((b, n_total, H, D)), jnp.float32)
  table = jnp.arange(b * M, dtype=jnp.int32).reshape(b, M)[:, ::-1]
  shapes = dict(num_pages=b * M, page_size=S, num_kv_heads=H, head_dim=D)
  k_pool = quant.init_quant_pages(k_spec, **shapes)
  v_pool = quant.init_quant_pages(v_spec, **shapes)
  ns = max(layout.staging_pages(k_spec, v_spec, S), 1)
  k_stage = v_stage = jnp.zeros((b, ns, S, H, D))
  lens = jnp.zeros((b,), jnp.int32)
  # one prefill shape (T=7), one decode shape (T=1): two traces at most (per preset)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      lambda *a: _step_impl(*a, k_spec=k_spec, v_spec=v_spec), n=2))
  prefill = jnp.array([7, 3], jnp.int32)
  steps = [(prefill, 7)] + [(jnp.array([1, 1], jnp.int32), 1)] * 9
  for num_new, t in steps:
    idx = jnp.clip(lens[:, None] + jnp.arange(t)[None], 0, n_total - 1)
    k_new = jnp.take_along_axis(kf, idx[..., None, None], axis=1)
    v_new = jnp.take_along_axis(vf, idx[..., None, None], axis=1)
    q = jnp.asarray(rng.standard_normal((b, HQ, D)), jnp.float32)
    k_pool, v_pool, k_stage, v_stage, out = step(
        k_pool, v_pool, k_stage, v_stage, table, lens, k_new, v_new, num_new, q)
    lens = lens + num_new
  dense_table = jnp.arange(b * M, dtype=jnp.int32).reshape(b, M)
  f = QuantSpec()
  dense = lambda k, v: paged_attention_reference(  # noqa: E731
      q, Pages(data=k.reshape(b * M, S, H, D)), Pages(data=v.reshape(b * M, S, H, D)),
      dense_table, lens, f, f)
  # exact semantics: folded pages are fold_page of their float page, the rest float
  first = layout.first_staged_page(lens, layout.residual_tokens(k_spec, v_spec), S)
  folded = (jnp.arange(M)[None, :] < first[:, None])[:, :, None, None, None]
  emulate = lambda x, spec: jnp.where(  # noqa: E731
      folded, quant.dequantize_pages(quant.fold_page(x.reshape(b, M, S, H, D), spec), spec),
      x.reshape(b, M, S, H, D))
  np.testing.assert_allclose(out, dense(emulate(kf, k_spec), emulate(vf, v_spec)), rtol=1e-5,
                             atol=1e-5)
  want = dense(kf, vf)
  err = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
  assert err < tol, err
