"""The two-tier cache replaying a generated trace: against the simulator's exact two-tier
model (hit for hit, per request), and sharded over the 8 host devices against the same
replay unsharded (identical pages, metadata and counters)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import tiers as kt
from kvjax.sharding import page_mesh
from kvjax.sim.replay import replay_cache
from kvjax.sim.tiers import two_tier
from kvjax.sim.traces import generate
from kvjax.tiers.ops import revalidate
from kvjax.tiers.placement import l2_memory_kind
from kvjax.tiers.placement import l2_shardings
from kvjax.tiers.placement import shard_tiers

# Small pools so that both tiers evict: requests of <= 8 blocks (block_size 512).
TRACE = generate(70, seed=3, num_prompts=4, prompt_blocks=(1, 3), turns=(2, 6),
                 user_tokens=(50, 1200), output_tokens=(20, 300), concurrent=6)
KW = dict(page_size=2, min_pages_per_seq=16)


def test_trace_is_small_and_reuses():
  lens = np.bincount(TRACE.request)
  assert lens.max() + 1 <= KW["min_pages_per_seq"]
  assert TRACE.num_blocks < TRACE.num_refs  # blocks recur


@pytest.mark.parametrize("procs,shared", [(None, True), ("conv", True), ("conv", False)])
def test_cache_equals_two_tier_model_request_by_request(procs, shared):
  p = None if procs is None else np.arange(TRACE.num_requests) % 2
  want = two_tier(TRACE, l1_pages=24, l2_pages=32, procs=p, shared_l2=shared)
  got = replay_cache(TRACE, l1_pages=24, l2_pages=32, procs=p, shared_l2=shared, **KW)
  assert want["l2_hits"] > 0 and want["l1_hits"] > 0  # both tiers serve
  for st in got["states"]:  # another process's writes make copy maps stale until a sync
    cfg = _config(st)
    kt.check_tiers(revalidate(st, config=cfg), config=cfg)
  if procs is not None and shared:
    # Known gap (docs/tiers.md): with one L2 shared by two processes, an L2 eviction resets
    # the evicting process's L1 copies of the page in the cache, but every process's in the
    # model (the other process's pointer stays stale until its next sync). Exact for the
    # first 30 requests on this tiny, thrashing pool; hit ratios within 0.02 (0.018 here;
    # the block-level model before the page-level one was within 0.003).
    np.testing.assert_array_equal(got["per_request"][:30], want["per_request"][:30])
    assert abs(got["hit_ratio_l1_l2"] - want["hit_ratio_l1_l2"]) <= 0.02
    return
  np.testing.assert_array_equal(got["per_request"], want["per_request"])


def test_l1_alone_equals_model():
  want = two_tier(TRACE, l1_pages=24, l2_pages=0)
  got = replay_cache(TRACE, l1_pages=24, l2_pages=0, **KW)
  np.testing.assert_array_equal(got["per_request"][:, 0], want["per_request"][:, 0])
  assert want["l2_hits"] == 0


def _config(st):
  from kvjax.cache.config import CacheConfig
  k = st.l1.k.data
  return CacheConfig(num_layers=k.shape[0], num_kv_heads=k.shape[3], head_dim=k.shape[4],
                     page_size=k.shape[2], num_pages=k.shape[1], max_seqs=1,
                     max_pages_per_seq=st.l1.page_table.shape[1])


def _fill(st, cfg, tc):
  """Distinct random content in every L1 page (so moves carry data)."""
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal(st.l1.k.data.shape), st.l1.k.data.dtype)
  return st.replace(l1=st.l1.replace(k=st.l1.k.replace(data=k),
                                     v=st.l1.v.replace(data=k * 2)))


def test_sharded_l2_equals_unsharded():
  assert len(jax.devices()) == 8
  mesh = page_mesh()

  def sharded(st, cfg, tc):
    st = shard_tiers(_fill(st, cfg, tc), cfg, tc, mesh)
    assert st.l2.k.data.sharding.spec == jax.sharding.PartitionSpec(None, tc.mesh_axis)
    return st

  kw = dict(l1_pages=24, l2_pages=32, l2_preset="int8", requests=40, **KW)
  plain = replay_cache(TRACE, prepare=_fill, **kw)
  split = replay_cache(TRACE, prepare=sharded, **kw)
  np.testing.assert_array_equal(plain["per_request"], split["per_request"])
  a, b = plain["states"][0], split["states"][0]
  assert plain["l2_hits"] > 0
  assert b.l2.k.data.sharding.spec == jax.sharding.PartitionSpec(None, "pages")  # kept
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_l2_shardings_from_config():
  import kvjax
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
                          num_pages=8, max_seqs=1, max_pages_per_seq=2)
  mesh = page_mesh(axis="l2")
  sh = l2_shardings(cfg, kt.TierConfig(l2_pages=16, mesh_axis="l2"), mesh)
  assert sh.k.data.spec == jax.sharding.PartitionSpec(None, "l2")
  assert sh.meta.tokens.spec == jax.sharding.PartitionSpec()
  assert sh.k.data.memory_kind == mesh.devices.reshape(-1)[0].default_memory().kind
  assert l2_memory_kind(mesh) is None  # CPU: the default memory kind
  with pytest.raises(ValueError, match="mesh_axis"):
    l2_shardings(cfg, kt.TierConfig(l2_pages=16), mesh)
  with pytest.raises(ValueError, match="divisible"):
    l2_shardings(cfg, kt.TierConfig(l2_pages=12, mesh_axis="l2"), mesh)
