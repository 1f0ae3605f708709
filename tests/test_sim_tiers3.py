"""The three-tier cache (L1, L2, an L3 ``BlockStore``) replaying a generated trace against
the simulator's exact model (``kvjax.sim.tiers.three_tier``), request by request and tier
by tier, for each write policy; pools small enough that every tier evicts and hits."""

import numpy as np
import pytest

from kvjax.sim.replay import replay_cache
from kvjax.sim.tiers import three_tier
from kvjax.sim.traces import from_requests
from kvjax.sim.traces import generate

# Requests of <= 8 blocks (block_size 512), 4 shared prompts: blocks recur across tiers.
TRACE = generate(70, seed=3, num_prompts=4, prompt_blocks=(1, 3), turns=(2, 6),
                 user_tokens=(50, 1200), output_tokens=(20, 300), concurrent=6)
KW = dict(page_size=2, min_pages_per_seq=16, l3_path="memory")
# (L1, L2, L3 pages, hits) per policy, chosen with the model so that all tiers hit and
# L3 evicts on the first 60 requests
POOLS = {"write_back": (20, 16, 16, 1), "write_through": (20, 12, 12, 1),
         "write_through_selective": (20, 16, 12, 2)}


def test_model_by_hand():
  t = from_requests([[1, 2], [3, 4], [5, 6], [1, 2]], [1024] * 4)
  r = three_tier(t, l1_pages=3, l2_pages=2, l3_pages=8)
  # each request evicts the one before from L1 (3 pages: 2 blocks + the partial page) and
  # L2 (2 pages) keeps the latest; [1, 2] went down to L3 when L2 took [3, 4]
  assert r["per_request"].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 2]]
  assert r["l3_writes"] == 6 and r["l3_evictions"] == 0  # [1, 2], [3, 4], then [5, 6] down
  with pytest.raises(ValueError, match="write"):
    three_tier(t, l1_pages=3, l2_pages=2, l3_pages=8, write="write_around")
  with pytest.raises(ValueError, match="L2"):
    three_tier(t, l1_pages=3, l2_pages=0, l3_pages=8)


@pytest.mark.parametrize("write", list(POOLS))
def test_cache_equals_three_tier_model_request_by_request(write):
  l1, l2, l3, hits = POOLS[write]
  kw = dict(l1_pages=l1, l2_pages=l2, l3_pages=l3, write=write, l3_hits=hits, requests=60)
  want = three_tier(TRACE, **kw)
  got = replay_cache(TRACE, **kw, **KW)
  np.testing.assert_array_equal(got["per_request"], want["per_request"])
  assert min(want["l1_hits"], want["l2_hits"], want["l3_hits"]) > 0     # every tier serves
  assert want["l3_evictions"] > 0 and got["store"]["evictions"] == want["l3_evictions"]
  assert got["store"]["writes"] == want["l3_writes"]
  assert got["stats"]["l3_hit_pages"] == want["l3_hits"]
  # the same blocks in the same store slots, with the same last use
  ix = got["states"][0].l3.store.index
  real = {int((ix.tokens[s][0] - 1) // 2): (int(ix.last_use[s]), int(s))
          for s in np.flatnonzero(ix.used)}
  store = want["pools"][2]
  assert real == {store.block[s]: (store.last[s], s) for s in store.last}
