"""Swap instead of refusal (``generate(..., tiers=...)``, ``kvjax.models.swap``).

The reference for every swapped run is the same batch through the plain loop with
the whole pool free: greedy outputs must be equal, token for token. The swapped run
gets the same pool (same config, so the same compiled steps) with most of it held by
a ballast: three sequences in slots the batch does not use. L2 is "bf16"
(unquantized: a page comes back bit-exact); prefill runs one token a step
(``chunk_size=1``, the decode step's shape), so a recomputed tail is computed in the
shape it was computed in first and the config compiles one step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import tiers
from kvjax.models import generate
from kvjax.models import init_params
from kvjax.models import LlamaConfig
from kvjax.models import swap

CFG = LlamaConfig.small()
PAGE, M = 4, 16
KW = dict(page_size=PAGE, num_pages=48, max_seqs=7, max_pages_per_seq=M)
CC = CFG.cache_config(**KW)
FREE = 12   # pages the ballast leaves to the batch: about half of what it needs
TC = tiers.TierConfig(l2_pages=64, l2_preset="bf16")
RUN = dict(config=CFG, stop_ids=(), chunk_size=1)
BATCH = [0, 1, 2, 3]
_plan = jax.jit(kvjax.plan_step, static_argnames="config")


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def ballast(cache, cc=CC):
  """``cache`` (a CacheState or TieredState) with all but ``FREE`` pages held in slots 4-6."""
  l1 = cache.l1 if isinstance(cache, tiers.TieredState) else cache
  held = cc.num_pages - FREE
  n = np.minimum(np.maximum(held * PAGE - np.arange(3) * M * PAGE, 0), M * PAGE)
  _, l1 = _plan(l1, jnp.array([4, 5, 6]), jnp.zeros((3, M * PAGE), jnp.int32),
                jnp.asarray(n, jnp.int32), config=cc)
  assert int(jnp.sum(l1.meta.ref_count > 0)) == held
  return cache.replace(l1=l1) if isinstance(cache, tiers.TieredState) else l1


def tenant_seeds(tenants):
  return np.stack([np.asarray(kvjax.tenant_seed(CC, tenant_salt=t)) for t in tenants])


def check_pages(loop):
  """Every resident row's pages carry its tenant's namespace; tenants share no page."""
  l1 = loop.ts.l1
  table, lens = np.asarray(l1.page_table), np.asarray(l1.seq_lens)
  namespace = np.asarray(l1.meta.namespace)
  owner = {}
  for r in np.flatnonzero(loop.phase == swap.RUNNING):
    slot = int(loop.ids[r])
    seed = tuple(loop.seeds[r].tolist())
    for p in table[slot][:-(-int(lens[slot]) // PAGE)]:
      assert tuple(namespace[p].tolist()) == seed, f"row {r} holds page {p} of another tenant"
      assert owner.setdefault(int(p), seed) == seed, f"page {p} shared across tenants"


def test_swapped_batch_equals_the_unswapped_run(params, monkeypatch):
  rng = np.random.default_rng(3)
  p, q = rng.integers(1, 255, 10).tolist(), rng.integers(1, 255, 14).tolist()
  prompts = [p, p, q, p]          # rows 0 and 1: same prompt, different tenants
  seeds = tenant_seeds("abaa")
  kw = dict(RUN, max_new_tokens=14, seeds=seeds)
  ref, _ = generate(params, kvjax.init(CC), prompts, BATCH, cache_config=CC, **kw)
  assert all(r.finish_reason == "length" for r in ref)
  plain, _ = generate(params, ballast(kvjax.init(CC)), prompts, BATCH, cache_config=CC, **kw)
  assert sum(r.finish_reason == "out_of_pages" for r in plain) >= 2   # what swapping avoids

  resumed = []
  resume = swap.SwapLoop.resume

  def checked_resume(loop, r):
    resume(loop, r)
    resumed.append(r)
    check_pages(loop)

  monkeypatch.setattr(swap.SwapLoop, "resume", checked_resume)
  stats = {}
  out, ts = generate(params, ballast(tiers.init(CC, TC)), prompts, BATCH, cache_config=CC,
                     tiers=TC, stats=stats, **kw)
  assert [list(r) for r in out] == [list(r) for r in ref]
  assert all(r.finish_reason == "length" for r in out)
  swaps = int(ts.stats.swaps_out)
  assert swaps >= 2 and int(ts.stats.swaps_in) == swaps == len(resumed)
  assert stats["recomputed"] > 0 and int(ts.stats.demotions) > 0
  assert not np.any(np.asarray(ts.l1.seq_lens)[BATCH])   # every row released when it ended
  tiers.check_tiers(ts, config=CC)


def test_a_row_that_does_not_fit_alone_ends_and_the_others_are_unaffected(params):
  rng = np.random.default_rng(4)
  prompts = [rng.integers(1, 255, 30).tolist()] + [rng.integers(1, 255, 5).tolist()
                                                   for _ in range(3)]
  kw = dict(RUN, max_new_tokens=30)   # row 0: 60 tokens = 15 pages > the 12 left to it
  ref, _ = generate(params, kvjax.init(CC), prompts, BATCH, cache_config=CC, **kw)
  out, ts = generate(params, ballast(tiers.init(CC, TC)), prompts, BATCH, cache_config=CC,
                     tiers=TC, **kw)
  assert out[0].finish_reason == "out_of_pages"
  assert 0 < len(out[0]) < 30 and list(out[0]) == list(ref[0])[:len(out[0])]
  assert [list(r) for r in out[1:]] == [list(r) for r in ref[1:]]
  assert all(r.finish_reason == "length" for r in out[1:])
  assert int(ts.stats.swaps_out) >= 1 and int(ts.stats.swaps_in) == int(ts.stats.swaps_out)
  tiers.check_tiers(ts, config=CC)


def test_checked_mode_raises_instead_of_swapping(params):
  cc = CFG.cache_config(checked=True, **KW)
  prompts = [[7] * 20] * 4    # 4 x 5 pages: the prefill runs out
  with pytest.raises(kvjax.CacheStatusError) as e:
    generate(params, ballast(tiers.init(cc, TC), cc), prompts, BATCH, cache_config=cc,
             tiers=TC, max_new_tokens=2, **RUN)
  assert isinstance(e.value.state, tiers.TieredState)
  assert int(e.value.state.stats.swaps_out) == 0
  assert "OUT_OF_PAGES" in str(e.value)


def test_tiers_and_cache_must_agree(params):
  with pytest.raises(ValueError, match="needs tiers"):
    generate(params, tiers.init(CC, TC), [[1]], [0], cache_config=CC, max_new_tokens=1, **RUN)
  with pytest.raises(ValueError, match="TieredState"):
    generate(params, kvjax.init(CC), [[1]], [0], cache_config=CC, tiers=TC, max_new_tokens=1,
             **RUN)
