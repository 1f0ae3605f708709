"""Ops called outside jit run as one compiled program (``jit_when_eager``) and behave as traced."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache.status import jit_when_eager

CFG = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2, num_pages=6,
                        max_seqs=2, max_pages_per_seq=3)


def test_eager_plan_step_equals_the_traced_op_and_compiles_once_per_shape():
  st = kvjax.init(CFG)
  args = (jnp.array([0, 1]), jnp.array([[1, 2, 3], [4, 5, 6]]), jnp.array([3, 2]))
  traced = jax.jit(kvjax.plan_step.__wrapped__, static_argnames="config")
  chex.assert_trees_all_equal(kvjax.plan_step(st, *args, config=CFG),
                              traced(st, *args, config=CFG))
  compiled = kvjax.plan_step.jitted   # its program cache
  before = compiled._cache_size()
  plan, st = kvjax.plan_step(st, *args, config=CFG)
  kvjax.plan_step(st, *args, config=CFG)                 # same shapes: no new program
  assert compiled._cache_size() == before
  assert plan.kv_lens.tolist() == [3, 2]
  # inside the caller's trace the op is traced in line, not called as a nested jit
  jaxpr = jax.make_jaxpr(lambda s: kvjax.release(s, jnp.array([0]), config=CFG))(st)
  nested = [e.params.get("name") for e in jaxpr.jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
  assert "release" not in nested, nested


def test_checked_mode_still_raises_after_an_eager_call_with_the_new_state():
  cfg = dataclasses.replace(CFG, checked=True, num_pages=1)
  with pytest.raises(kvjax.CacheStatusError) as err:
    kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]),
                    config=cfg)
  assert err.value.rows == {0: ["OUT_OF_PAGES"]}
  assert int(err.value.state.seq_lens[0]) == 0 and int(err.value.state.stats.steps) == 1
  # a trace-time error is the same ValueError eagerly
  with pytest.raises(ValueError, match="seq_ids"):
    kvjax.release(kvjax.init(CFG), jnp.zeros((1, 1), jnp.int32), config=CFG)


def test_unhashable_static_arguments_fall_back_to_the_op_by_op_call():
  calls = []

  @jit_when_eager("scale")
  def f(x, *, scale):
    calls.append(type(x).__name__)
    return x * sum(scale)

  np.testing.assert_array_equal(f(jnp.arange(3), scale=(2,)), [0, 2, 4])    # jitted: traced
  assert calls[-1] != "ArrayImpl"
  np.testing.assert_array_equal(f(jnp.arange(3), scale=[2]), [0, 2, 4])     # a list: eager
  assert calls[-1] == "ArrayImpl"
