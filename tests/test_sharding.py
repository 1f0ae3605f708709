"""Shardings of the cache over 8 host devices: the page axis split, the rest replicated."""

import jax
import pytest

import kvjax
from kvjax import sharding
from kvjax.models import LlamaConfig

CFG = LlamaConfig.small()
CC = CFG.cache_config(page_size=4, num_pages=32, max_seqs=3, max_pages_per_seq=8)


def test_shard_cache_splits_pages_and_replicates_metadata():
  """Placement only; the sharded decode step is checked in tests/test_model.py."""
  assert jax.device_count() == 8, "conftest sets 8 host devices"
  cache = sharding.shard_cache(kvjax.init(CC), CC, sharding.page_mesh())
  assert cache.k.data.sharding.spec == jax.sharding.PartitionSpec(None, "pages")
  assert len(cache.k.data.addressable_shards) == 8
  assert cache.k.data.addressable_shards[0].data.shape[1] == CC.num_pages // 8
  assert cache.meta.ref_count.sharding.is_fully_replicated
  assert cache.page_table.sharding.is_fully_replicated


def test_cache_shardings_rejects_uneven_pages_and_unknown_axis():
  mesh = sharding.page_mesh()
  odd = CFG.cache_config(page_size=4, num_pages=12, max_seqs=3, max_pages_per_seq=4)
  with pytest.raises(ValueError, match=r"num_pages \(12\) must be divisible .* size \(8\)"):
    sharding.cache_shardings(odd, mesh)
  with pytest.raises(ValueError, match="axis 'model' is not a mesh axis"):
    sharding.cache_shardings(CC, mesh, axis="model")


def test_quantized_cache_shards_pages_and_replicates_the_staging_ring():
  preset = kvjax.layout.PRESETS["int2-kbf-r128-s4"]   # a ring and sink rows (max_seqs 3:
  cc = CFG.cache_config(page_size=16, num_pages=32, max_seqs=3, max_pages_per_seq=8,  # not 8k)
                        key_quant=preset[0], value_quant=preset[1])
  cache = sharding.shard_cache(kvjax.init(cc), cc, sharding.page_mesh())
  assert cache.k.stage is not None and cache.k.stage.sharding.is_fully_replicated
  assert cache.v.sink is not None and cache.v.sink.sharding.is_fully_replicated
  assert cache.k.scale.sharding.spec == jax.sharding.PartitionSpec(None, "pages")
  assert cache.v.data.sharding.spec == jax.sharding.PartitionSpec(None, "pages")
