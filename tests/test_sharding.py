"""The cache's page axis sharded over 8 host devices: same logits as unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import sharding
from kvjax.models import LlamaConfig
from kvjax.models import decode_step
from kvjax.models import init_params

CFG = LlamaConfig.small()
CC = CFG.cache_config(page_size=4, num_pages=32, max_seqs=3, max_pages_per_seq=8)


def run(cache, params, steps):
  outs = []
  for tokens, ids, n in steps:
    logits, cache = decode_step(params, cache, tokens, ids, n, config=CFG, cache_config=CC)
    outs.append(np.asarray(logits))
  return outs, cache


def test_decode_step_sharded_over_pages_matches_unsharded():
  assert jax.device_count() == 8, "conftest sets 8 host devices"
  params = init_params(CFG, jax.random.key(1))
  rng = np.random.default_rng(0)
  ids = jnp.arange(3, dtype=jnp.int32)
  steps = [(jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 7)), jnp.int32), ids,
            jnp.array([7, 3, 5], jnp.int32))]
  steps += [(jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 1)), jnp.int32), ids,
             jnp.ones((3,), jnp.int32)) for _ in range(3)]
  want, _ = run(kvjax.init(CC), params, steps)
  mesh = sharding.page_mesh()
  cache = sharding.shard_cache(kvjax.init(CC), CC, mesh)
  assert cache.k.data.sharding.spec == jax.sharding.PartitionSpec(None, "pages")
  assert len(cache.k.data.addressable_shards) == 8
  assert cache.k.data.addressable_shards[0].data.shape[1] == CC.num_pages // 8
  got, cache = run(cache, params, steps)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)  # float32, reordered reductions
  assert int(cache.status) == 0


def test_cache_shardings_rejects_uneven_pages_and_unknown_axis():
  mesh = sharding.page_mesh()
  odd = CFG.cache_config(page_size=4, num_pages=12, max_seqs=3, max_pages_per_seq=4)
  with pytest.raises(ValueError, match=r"num_pages \(12\) must be divisible .* size \(8\)"):
    sharding.cache_shardings(odd, mesh)
  with pytest.raises(ValueError, match="axis 'model' is not a mesh axis"):
    sharding.cache_shardings(CC, mesh, axis="model")
