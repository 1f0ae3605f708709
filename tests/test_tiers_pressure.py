"""Pressure across tiers (kvjax.tiers.relieve / relieve_l2): L2 evicts ahead of need at its
own levels (60 / 80 / 90 %), the coldest pages first, into L3 when that tier exists.

The reference is plain Python over the state's metadata before the call: the level and
the number of pages from the thresholds and targets, the victims from the documented
order (orphans, then pages that are no L1 page's copy, then copies; by last access,
deepest first, then page id). After it: the tier invariants hold, every surviving L1
copy is intact, a prompt still in L1 is served as before, and an evicted page comes
back from L3 (exactly: bf16) or is recomputed, never served from a freed L2 page.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import tiers
from kvjax.tiers import ops as tier_ops
from kvjax.tiers.invariants import check_tiers
from test_tiers_l3 import CFG, S, errors, make_tier, new_state, release, run_prompt

TC = tiers.TierConfig(l2_pages=10, l2_preset="bf16", batch=2)
PROMPTS = [[1, 2, 3, 4, 5], [11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35]]


def py_relief(m2: dict, copy: np.ndarray, tc: tiers.TierConfig):
  """(level, victims) by the documented rule, in plain Python."""
  held = [q for q in range(tc.l2_pages) if m2["filled"][q] > 0]
  occ = len(held)
  level = sum(occ >= round(t * tc.l2_pages, 6) for t in tc.thresholds)
  if level == 0:
    return 0, []
  keep = math.floor(tc.targets[level - 1] * tc.l2_pages + 1e-4)
  n = min(-(-max(occ - keep, 0) // tc.batch) * tc.batch, occ)
  copies = set(int(c) for c in copy if c >= 0)

  def key(q):
    group = 0 if m2["parent"][q] == -2 else 1 + (q in copies)
    return (group, int(m2["last_access"][q]), -int(m2["position"][q]), q)

  return level, sorted(held, key=key)[:n]


def filled(ts, tier=None):
  """L2 after PROMPTS were each run and released in turn (L1 of 5 pages evicts the older)."""
  ts = new_state(tier, tc=TC) if tier is not None else tiers.init(CFG, TC)
  for p in PROMPTS:
    _, ts = run_prompt(ts, 0, p, TC)
    ts = release(ts, 0)
  return tier_ops.sync(ts, config=CFG, tiers=TC)


def test_relieve_l2_evicts_the_reference_victims_down_to_the_target():
  ts = filled(None)
  m2 = tier_ops.host_meta(ts.l2.meta)
  copy = np.asarray(ts.l1_copy)
  want_level, want = py_relief(m2, copy, TC)
  assert want_level >= 1 and want, "the fixture must put L2 under pressure"
  before = int(ts.stats.l2_evictions)
  lv, after = tier_ops.relieve_l2(ts, config=CFG, tiers=TC)
  assert lv == want_level
  m2a = tier_ops.host_meta(after.l2.meta)
  gone = [q for q in range(TC.l2_pages) if m2["filled"][q] > 0 and m2a["filled"][q] == 0]
  assert sorted(gone) == sorted(want)
  assert int(after.stats.l2_evictions) - before == len(want)
  check_tiers(after, config=CFG)
  # every L1 copy that did not point at a victim is untouched
  copy_a = np.asarray(after.l1_copy)
  for p, q in enumerate(copy):
    assert copy_a[p] == (-1 if q in want else q)
  # each call relieves from the level it finds (as L1's relieve does): repeated calls
  # follow the reference down below the first threshold, then change nothing
  for _ in range(TC.l2_pages):
    m2a, copy_a = tier_ops.host_meta(after.l2.meta), np.asarray(after.l1_copy)
    want_level, want = py_relief(m2a, copy_a, TC)
    lv, after = tier_ops.relieve_l2(after, config=CFG, tiers=TC)
    held = tier_ops.host_meta(after.l2.meta)["filled"] > 0
    assert lv == want_level and not any(held[q] for q in want)
    check_tiers(after, config=CFG)
    if not want:
      break
  assert held.sum() < TC.thresholds[0] * TC.l2_pages


def test_relieve_l2_at_low_occupancy_changes_nothing():
  ts = tiers.init(CFG, TC)
  _, ts = run_prompt(ts, 0, PROMPTS[0], TC)
  ts = tier_ops.sync(release(ts, 0), config=CFG, tiers=TC)
  lv, after = tier_ops.relieve_l2(ts, config=CFG, tiers=TC)
  assert lv == 0 and after is ts


def test_relieve_across_tiers_demotes_l2_victims_to_l3_and_serves_them_exactly():
  tier = make_tier(tc=TC)
  ts = filled(None, tier)
  m2 = tier_ops.host_meta(ts.l2.meta)
  _, want = py_relief(m2, np.asarray(ts.l1_copy), TC)
  pages_before = tier.store.stats()["pages"]
  _, after = tiers.relieve(ts, config=CFG, tiers=TC)
  check_tiers(after, config=CFG)
  assert tier.store.stats()["pages"] > pages_before      # the victims went down to L3
  # the oldest prompt is in neither L1 nor (after the relief) L2: served from L3, exactly
  oldest = PROMPTS[0]
  c, ts2 = run_prompt(after, 1, oldest, TC)
  assert c == (len(oldest) // S) * S
  assert int(ts2.stats.l3_hit_pages) > int(after.stats.l3_hit_pages)
  assert all(float(e.max()) == 0.0 for e in errors(ts2, 1, oldest, c))
  check_tiers(ts2, config=CFG)
  tier.close()


def test_l2_pressure_config_is_validated():
  with pytest.raises(ValueError, match="targets"):
    tiers.TierConfig(l2_pages=8, targets=(0.7, 0.7, 0.8))
  with pytest.raises(ValueError, match="batch"):
    tiers.TierConfig(l2_pages=8, batch=0)


def test_l2_victims_order_by_hand():
  # pages: 0 root (copy of an L1 page), 1 its child, 2 an orphan (parent evicted),
  # 3 an old root, 4 empty; stamps 5, 5, 9, 1, -
  m2 = {"filled": np.array([2, 2, 2, 2, 0]), "parent": np.array([-1, 0, -2, -1, -1]),
        "last_access": np.array([5, 5, 9, 1, 0]), "position": np.array([0, 1, 3, 0, 0])}
  copy = np.array([0, -1])
  assert tier_ops.l2_victims(m2, copy, 4).tolist() == [2, 3, 1, 0]
  assert tier_ops.l2_victims(m2, copy, 2).tolist() == [2, 3]
