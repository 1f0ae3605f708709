"""Fast tests of kvjax.models on random weights (no SmolLM2 needed)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.models import llama
from kvjax.models.gguf_loader import permute_rows
from kvjax.models.gguf_loader import unpermute_rows
from kvjax.models.tokenizer import build_tokenizer
from kvjax.models.tokenizer import chat_prompt

CFG = llama.LlamaConfig.small()
# One cache config and batch size 4 for every paged test: decode_step compiles once
# per (config, B, T), so sharing them keeps this file fast.
CACHE = CFG.cache_config(page_size=4, num_pages=32, max_seqs=6, max_pages_per_seq=8)
BATCH = 4


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CFG, jax.random.key(0))


# ----------------------------------------------------------------------------- references


def _rope_complex(x, positions, base):
  """Rotate-half RoPE as complex multiplication: (x[i], x[i+D/2]) is one complex number."""
  d = x.shape[-1]
  z = x[..., : d // 2] + 1j * x[..., d // 2:]
  theta = base ** (-np.arange(d // 2) * 2.0 / d)
  z = z * np.exp(1j * positions[..., None, None] * theta)
  return np.concatenate([z.real, z.imag], axis=-1)


def _rope_adjacent(x, positions, base):
  """llama.cpp's convention: (x[2i], x[2i+1]) is one complex number."""
  d = x.shape[-1]
  z = x[..., 0::2] + 1j * x[..., 1::2]
  theta = base ** (-np.arange(d // 2) * 2.0 / d)
  z = z * np.exp(1j * positions[..., None, None] * theta)
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def _numpy_forward(p, tokens, cfg):
  """Token-by-token, head-by-head float64 reference of the whole model."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  lp = p.layers

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_eps) * w

  out = np.zeros(tokens.shape + (cfg.vocab_size,))
  g = cfg.num_heads // cfg.num_kv_heads
  d = cfg.head_dim
  for b in range(tokens.shape[0]):
    x = p.embed[tokens[b]]  # [T, E]
    t = x.shape[0]
    pos = np.arange(t, dtype=np.float64)
    for layer in range(cfg.num_layers):
      h = norm(x, lp.attn_norm[layer])
      q = (h @ lp.wq[layer]).reshape(t, cfg.num_heads, d)
      k = (h @ lp.wk[layer]).reshape(t, cfg.num_kv_heads, d)
      v = (h @ lp.wv[layer]).reshape(t, cfg.num_kv_heads, d)
      q, k = _rope_complex(q, pos, cfg.rope_base), _rope_complex(k, pos, cfg.rope_base)
      attn = np.zeros((t, cfg.num_heads, d))
      for head in range(cfg.num_heads):
        kv = head // g
        for i in range(t):
          s = k[: i + 1, kv] @ q[i, head] / math.sqrt(d)
          w = np.exp(s - s.max())
          attn[i, head] = (w / w.sum()) @ v[: i + 1, kv]
      x = x + attn.reshape(t, -1) @ lp.wo[layer]
      h = norm(x, lp.mlp_norm[layer])
      gate = h @ lp.w_gate[layer]
      x = x + (gate / (1 + np.exp(-gate)) * (h @ lp.w_up[layer])) @ lp.w_down[layer]
    out[b] = norm(x, p.final_norm) @ p.embed.T
  return out


# ----------------------------------------------------------------------------- pieces


def test_rope_matches_complex_rotation():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  pos = rng.integers(0, 1000, (2, 5)).astype(np.int32)
  got = llama.rope(jnp.asarray(x), jnp.asarray(pos), 10000.0)
  np.testing.assert_allclose(got, _rope_complex(x, pos, 10000.0), atol=2e-4)


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    rq = llama.rope(q, jnp.array([[m]]), 10000.0)
    rk = llama.rope(k, jnp.array([[n]]), 10000.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_unpermuted_rows_with_rotate_half_equal_gguf_rows_with_adjacent_pairs():
  # A projection in rotate-half layout, permuted as llama.cpp's converter does, then
  # roped with adjacent pairs, gives the same attention scores as un-permuting it
  # back and using our rotate-half RoPE.
  rng = np.random.default_rng(2)
  heads, d, e = 3, 8, 12
  w_hf = rng.standard_normal((heads * d, e))
  w_gguf = permute_rows(w_hf, heads)
  np.testing.assert_array_equal(unpermute_rows(w_gguf, heads), w_hf)
  x = rng.standard_normal((6, e))
  pos = np.arange(6, dtype=np.float64)
  q_gguf = _rope_adjacent((x @ w_gguf.T).reshape(6, heads, d), pos, 100.0)
  q_ours = np.asarray(llama.rope(
      jnp.asarray((x @ unpermute_rows(w_gguf, heads).T).reshape(1, 6, heads, d), jnp.float32),
      jnp.asarray(pos[None], jnp.int32), 100.0))[0]
  s_gguf = np.einsum("thd,shd->hts", q_gguf, q_gguf)
  s_ours = np.einsum("thd,shd->hts", q_ours, q_ours)
  np.testing.assert_allclose(s_ours, s_gguf, rtol=1e-4, atol=1e-3)


def test_causal_attention_matches_per_head_loop():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
  k = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
  got = np.asarray(llama.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
  for b in range(2):
    for h in range(4):
      for i in range(5):
        s = k[b, : i + 1, h // 2] @ q[b, i, h] / math.sqrt(8)
        w = np.exp(s - s.max())
        np.testing.assert_allclose(got[b, i, h], (w / w.sum()) @ v[b, : i + 1, h // 2],
                                   atol=1e-5)
  # Query blocks (here of 2 tokens, the last one partial) give the same result.
  blocked = llama.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block=2)
  np.testing.assert_allclose(blocked, got, atol=1e-6)


# ----------------------------------------------------------------------------- forward


def test_forward_matches_numpy_reference(params):
  tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 7)).astype(np.int32)
  got = llama.forward(params, jnp.asarray(tokens), CFG)
  assert got.shape == (2, 7, CFG.vocab_size) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _numpy_forward(params, tokens, CFG), atol=1e-4, rtol=1e-4)


def test_forward_is_causal(params):
  tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (1, 9)).astype(np.int32)
  changed = tokens.copy()
  changed[0, 6:] = (changed[0, 6:] + 1) % CFG.vocab_size
  a = llama.forward(params, jnp.asarray(tokens), CFG)
  b = llama.forward(params, jnp.asarray(changed), CFG)
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_token_nll_matches_log_softmax_of_forward(params):
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
  logp = jax.nn.log_softmax(llama.forward(params, tokens, CFG), axis=-1)
  want = -np.take_along_axis(np.asarray(logp[:, :-1]), np.asarray(tokens[:, 1:, None]), -1)[..., 0]
  np.testing.assert_allclose(llama.token_nll(params, tokens, CFG), want, atol=1e-5)


def test_perplexity_windows_are_independent(params):
  from kvjax.models.perplexity import window_nll

  ids = np.random.default_rng(7).integers(0, CFG.vocab_size, 24)
  got = window_nll(params, CFG, ids, window=8, num_windows=3)
  want = llama.token_nll(params, jnp.asarray(ids.reshape(3, 8), jnp.int32), CFG)
  np.testing.assert_allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=3), "num_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(d_model=0), "d_model"),
    (dict(rms_eps=0.0), "rms_eps"),
])
def test_config_rejects_bad_values(kwargs, match):
  base = dict(vocab_size=16, d_model=8, num_layers=1, num_heads=4, num_kv_heads=2,
              head_dim=4, ffn_dim=8)
  with pytest.raises(ValueError, match=match):
    llama.LlamaConfig(**{**base, **kwargs})


def test_forward_rejects_bad_token_shape(params):
  with pytest.raises(ValueError, match="tokens"):
    llama.forward(params, jnp.zeros((4,), jnp.int32), CFG)


def test_check_params_names_the_bad_array(params):
  bad = params.replace(final_norm=jnp.ones((3,)))
  with pytest.raises(ValueError, match="final_norm"):
    llama.check_params(bad, CFG)


# ----------------------------------------------------------------------------- tokenizer


def test_bpe_tokenizer_splits_digits_and_keeps_specials_whole():
  # Byte-level alphabet for "a", "b", "1", "2", space ("Ġ"); merges build "ab" and "Ġab".
  tokens = ["<|im_end|>", "a", "b", "1", "2", "Ġ", "ab", "Ġab", "12"]
  tok = build_tokenizer(tokens, ["a b", "Ġ ab", "1 2"], ["<|im_end|>"])
  ids = tok.encode("ab ab12<|im_end|>", add_special_tokens=False).ids
  # "12" exists as a merge but digits are pre-split one by one.
  assert [tokens[i] for i in ids] == ["ab", "Ġab", "1", "2", "<|im_end|>"]
  assert tok.decode(ids, skip_special_tokens=True) == "ab ab12"


def test_chat_prompt_is_chatml():
  got = chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
  assert got == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" \
                "<|im_start|>assistant\n"
  assert chat_prompt([{"role": "user", "content": "Q"}]).startswith(
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  with pytest.raises(ValueError, match="messages"):
    chat_prompt([{"content": "no role"}])


# ----------------------------------------------------------------------------- paged decode


def run_schedule(params, cfg, cache_config, seqs, schedule):
  """Feed ``seqs`` through ``decode_step`` following ``schedule``; collect every logit.

  ``schedule`` is a list of (T, [num_new per row]) steps; a row with 0 new tokens
  is sent as padding (seq id -1). Returns the logits of each row's tokens in order.
  """
  import kvjax

  cache = kvjax.init(cache_config)
  done = [0] * len(seqs)
  got = [[] for _ in seqs]
  for t, num_new in schedule:
    tokens = np.zeros((len(seqs), t), np.int32)
    for r, n in enumerate(num_new):
      tokens[r, :n] = seqs[r][done[r]:done[r] + n]
    ids = np.array([r if n else -1 for r, n in enumerate(num_new)], np.int32)
    logits, cache = llama.decode_step(params, cache, jnp.asarray(tokens), jnp.asarray(ids),
                                      jnp.asarray(num_new, jnp.int32), config=cfg,
                                      cache_config=cache_config)
    assert int(cache.status) == 0, kvjax.status_names(int(cache.status))
    for r, n in enumerate(num_new):
      got[r].extend(np.asarray(logits[r, :n]))
      done[r] += n
  assert done == [len(s) for s in seqs]
  return [np.stack(g) for g in got], cache


def reference_logits(params, cfg, seqs):
  """Full no-cache forward of each sequence (right-padded batch: causal, so padding is inert)."""
  longest = max(len(s) for s in seqs)
  batch = np.zeros((len(seqs), longest), np.int32)
  for r, s in enumerate(seqs):
    batch[r, :len(s)] = s
  full = np.asarray(llama.forward(params, jnp.asarray(batch), cfg))
  return [full[r, :len(s)] for r, s in enumerate(seqs)]


# Prefill chunks of different sizes (T = 5, 3, 7), rows at different offsets, a
# padding row and an idle row, then single-token decode; page size 4 so every
# sequence crosses several page boundaries, some in the middle of a chunk.
SCHEDULE = [
    (5, [5, 2, 0, 5]),
    (3, [3, 3, 1, 0]),
    (7, [7, 0, 7, 7]),
    (7, [1, 4, 6, 2]),
] + [(1, [1, 1, 1, 1])] * 4 + [(1, [1, 0, 1, 1])]


def test_paged_decode_matches_forward(params):
  cache_config = CACHE
  lengths = [sum(step[1][r] for step in SCHEDULE) for r in range(4)]
  rng = np.random.default_rng(8)
  seqs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
  got, cache = run_schedule(params, CFG, cache_config, seqs, SCHEDULE)
  want = reference_logits(params, CFG, seqs)
  for r in range(4):
    np.testing.assert_allclose(got[r], want[r], atol=1e-4, rtol=1e-4,
                               err_msg=f"row {r} (length {lengths[r]})")
  assert np.asarray(cache.seq_lens)[:4].tolist() == lengths


def test_decode_step_compiles_once(params, caplog):
  import logging

  import kvjax

  cache_config = CACHE
  cache = kvjax.init(cache_config)
  rng = np.random.default_rng(9)

  def call(cache, ids, num_new):
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (BATCH, 3)), jnp.int32)
    return llama.decode_step(params, cache, tokens, jnp.asarray(ids, jnp.int32),
                             jnp.asarray(num_new, jnp.int32), config=CFG,
                             cache_config=cache_config)

  _, cache = call(cache, [0, 1, 3, -1], [3, 2, 1, 0])  # first call may compile
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    caplog.clear()
    _, cache = call(cache, [1, 2, -1, 4], [1, 3, 0, 2])
    _, cache = call(cache, [0, -1, 5, 3], [2, 0, 3, 3])
  compiles = [r.getMessage() for r in caplog.records if "decode_step" in r.getMessage()
              and "Compiling" in r.getMessage()]
  assert compiles == []
  assert np.asarray(cache.seq_lens).tolist() == [5, 3, 3, 4, 2, 3]


def test_decode_step_donates_the_cache(params):
  import kvjax

  cache = kvjax.init(CACHE)
  _, new = llama.decode_step(params, cache, jnp.zeros((BATCH, 1), jnp.int32),
                             jnp.array([0, 1, 2, 3]), jnp.array([1, 1, 1, 1]), config=CFG,
                             cache_config=CACHE)
  assert cache.k.data.is_deleted() and not new.k.data.is_deleted()


def test_decode_step_rejects_mismatched_cache_and_shapes(params):
  import kvjax

  bad = kvjax.CacheConfig(num_layers=CFG.num_layers, num_kv_heads=4, head_dim=CFG.head_dim,
                          page_size=4, num_pages=8, max_seqs=2, max_pages_per_seq=4)
  with pytest.raises(ValueError, match="num_kv_heads"):
    llama.decode_step(params, kvjax.init(bad), jnp.zeros((1, 2), jnp.int32), jnp.array([0]),
                      jnp.array([2]), config=CFG, cache_config=bad)
  good = CFG.cache_config(page_size=4, num_pages=8, max_seqs=2, max_pages_per_seq=4)
  with pytest.raises(ValueError, match="num_new"):
    llama.decode_step(params, kvjax.init(good), jnp.zeros((2, 2), jnp.int32),
                      jnp.array([0, 1]), jnp.array([2]), config=CFG, cache_config=good)


# ----------------------------------------------------------------------------- host loops


def _greedy_reference(params, prompt, steps, width=32):
  """Greedy continuation by re-running the full forward on the growing sequence.

  The sequence is right-padded to ``width`` (causal: padding is inert) so the
  forward compiles once.
  """
  seq = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(seq)] = seq
    logits = llama.forward(params, jnp.asarray(padded), CFG)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_generate_matches_greedy_forward_and_prefill_matches_last_logits(params):
  import kvjax
  from kvjax.models.generate import generate
  from kvjax.models.generate import prefill

  cache_config = CACHE
  rng = np.random.default_rng(10)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (9, 3, 14, 1)]
  last, cache = prefill(params, kvjax.init(cache_config), prompts, [2, 0, 1, 5], config=CFG,
                        cache_config=cache_config, chunk_size=5)
  want = reference_logits(params, CFG, prompts)
  for r in range(BATCH):
    np.testing.assert_allclose(last[r], want[r][-1], atol=1e-4, rtol=1e-4)
  assert np.asarray(cache.seq_lens)[[2, 0, 1, 5]].tolist() == [9, 3, 14, 1]

  steps = []
  out, cache = generate(params, kvjax.init(cache_config), prompts, [0, 1, 2, 3], config=CFG,
                        cache_config=cache_config, max_new_tokens=6, stop_ids=(),
                        chunk_size=7, on_step=steps.append)
  for r, p in enumerate(prompts):
    assert out[r] == _greedy_reference(params, p, 6), f"row {r}"
  assert sum(steps) == 6 * BATCH
  # The cache holds each prompt and all generated tokens but the last.
  assert np.asarray(cache.seq_lens)[:BATCH].tolist() == [9 + 5, 3 + 5, 14 + 5, 1 + 5]


def test_prefill_padded_to_a_larger_batch_is_the_unpadded_prefill(params):
  # pad_rows runs the steps of a 4-row batch for 2 prompts: the padding rows write nothing,
  # so the logits and every array of the cache are those of the unpadded run, bit for bit
  import kvjax
  from kvjax.models.generate import prefill

  rng = np.random.default_rng(11)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (9, 3)]
  kw = dict(config=CFG, cache_config=CACHE, chunk_size=5)
  want, ref = prefill(params, kvjax.init(CACHE), prompts, [4, 1], **kw)
  got, padded = prefill(params, kvjax.init(CACHE), prompts, [4, 1], pad_rows=BATCH, **kw)
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="pad_rows"):
    prefill(params, kvjax.init(CACHE), prompts, [4, 1], pad_rows=1, **kw)


# A page table wider than the loops' narrowest attention bucket (16 pages): generate and
# prefill attend over 16 columns of it, not 20.
WIDE = CFG.cache_config(page_size=4, num_pages=48, max_seqs=6, max_pages_per_seq=20)


def test_context_pages_attends_over_the_rows_own_pages_and_flags_a_row_it_cannot_hold(params):
  import kvjax
  from kvjax.models.generate import context_bucket

  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (BATCH, 7)), jnp.int32)
  ids, n = jnp.array([0, 1, 2, -1]), jnp.array([7, 3, 5, 0])
  out = {}
  for width in (None, 16, 1):    # 1 page (4 tokens) holds row 1 only
    logits, cache = llama.decode_step(params, kvjax.init(WIDE), tokens, ids, n, config=CFG,
                                      cache_config=WIDE, context_pages=width)
    out[width] = np.asarray(logits), np.asarray(cache.seq_status), np.asarray(cache.seq_lens)
  full, narrow, tiny = out[None], out[16], out[1]
  for r, k in enumerate([7, 3, 5]):
    np.testing.assert_allclose(narrow[0][r, :k], full[0][r, :k], atol=1e-5, rtol=1e-5)
  assert full[1][:3].tolist() == narrow[1][:3].tolist() == [0, 0, 0]
  # rows 0 and 2 do not fit one page: flagged, their K/V written all the same; row 1 is exact
  assert tiny[1][:3].tolist() == [kvjax.BAD_INPUT, 0, kvjax.BAD_INPUT]
  assert tiny[2][:3].tolist() == full[2][:3].tolist() == [7, 3, 5]
  np.testing.assert_allclose(tiny[0][1, :3], full[0][1, :3], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="context_pages"):
    llama.decode_step(params, kvjax.init(WIDE), tokens, ids, n, config=CFG, cache_config=WIDE,
                      context_pages=21)
  assert context_bucket(np.array([7, 3, 5, 0]), 4, 20) == 16
  assert context_bucket(np.array([65]), 4, 20) == 20


def test_generate_over_a_wide_table_matches_greedy_forward(params):
  import kvjax
  from kvjax.models.generate import generate

  rng = np.random.default_rng(11)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (9, 3, 14, 1)]
  out, _ = generate(params, kvjax.init(WIDE), prompts, [0, 1, 2, 3], config=CFG,
                    cache_config=WIDE, max_new_tokens=5, stop_ids=(), chunk_size=7)
  for r, p in enumerate(prompts):
    assert out[r] == _greedy_reference(params, p, 5), f"row {r}"


def test_generate_ends_a_refused_row_and_finishes_the_others(params):
  import kvjax
  from kvjax.models.generate import generate

  # Row 2 reaches max_seq_len (32 tokens) after 4 decode steps: it ends with "length" and
  # the 5 tokens it got; the other rows are exactly what they give alone. The cache is
  # handed back usable (on main this raised after the donated step and lost it).
  prompts = [[1, 2], [3], list(range(1, 29)), [4, 5]]
  out, cache = generate(params, kvjax.init(CACHE), prompts, [0, 1, 2, 3], config=CFG,
                        cache_config=CACHE, max_new_tokens=8, stop_ids=(), chunk_size=7)
  assert [o.finish_reason for o in out] == ["length", "length", "length", "length"]
  assert len(out[2]) == 5 and out[2] == _greedy_reference(params, prompts[2], 5)
  for r in (0, 1, 3):
    assert out[r] == _greedy_reference(params, prompts[r], 8), f"row {r}"
  assert np.asarray(cache.seq_lens)[:4].tolist() == [2 + 7, 1 + 7, 32, 2 + 7]
  assert kvjax.flagged_rows(cache) == {2: ["SEQ_FULL"]}


def test_decode_step_with_pages_sharded_over_8_devices_matches_unsharded(params):
  import kvjax
  from kvjax.sharding import page_mesh
  from kvjax.sharding import shard_cache

  if len(jax.devices()) < 8:
    pytest.skip(f"needs 8 devices (tests/conftest.py sets 8 host devices), got {len(jax.devices())}")
  mesh = page_mesh(jax.devices()[:8])
  schedule = [(7, [7, 5, 0, 3]), (7, [4, 7, 7, 7]), (1, [1, 1, 1, 1]), (1, [1, 1, 0, 1])]
  lengths = [sum(s[1][r] for s in schedule) for r in range(BATCH)]
  rng = np.random.default_rng(11)
  seqs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
  caches = {"plain": kvjax.init(CACHE), "sharded": shard_cache(kvjax.init(CACHE), CACHE, mesh)}
  got = {name: [] for name in caches}
  for name in caches:
    cache, done = caches[name], [0] * BATCH
    for t, num_new in schedule:
      tokens = np.zeros((BATCH, t), np.int32)
      for r, n in enumerate(num_new):
        tokens[r, :n] = seqs[r][done[r]:done[r] + n]
        done[r] += n
      ids = np.array([r if n else -1 for r, n in enumerate(num_new)], np.int32)
      logits, cache = llama.decode_step(params, cache, jnp.asarray(tokens), jnp.asarray(ids),
                                        jnp.asarray(num_new, jnp.int32), config=CFG,
                                        cache_config=CACHE)
      got[name].append(np.asarray(logits))
    caches[name] = cache
  # The returned cache keeps its pages split over the 8 devices.
  out_sharding = caches["sharded"].k.data.sharding
  assert len(out_sharding.device_set) == 8
  assert out_sharding.shard_shape(caches["sharded"].k.data.shape)[1] == CACHE.num_pages // 8
  for step, (a, b) in enumerate(zip(got["plain"], got["sharded"])):
    valid = np.arange(a.shape[1])[None, :] < np.array(schedule[step][1])[:, None]
    np.testing.assert_allclose(b[valid], a[valid], atol=1e-5, err_msg=f"step {step}")
  np.testing.assert_array_equal(caches["sharded"].k.data, caches["plain"].k.data)


def test_forward_and_decode_step_reject_params_of_another_config(params):
  import kvjax

  other = llama.LlamaConfig(**{**CFG.__dict__, "ffn_dim": 96})
  with pytest.raises(ValueError, match="w_gate"):
    llama.forward(params, jnp.zeros((1, 2), jnp.int32), other)
  cache_config = other.cache_config(page_size=4, num_pages=8, max_seqs=2, max_pages_per_seq=4)
  with pytest.raises(ValueError, match="w_gate"):
    llama.decode_step(params, kvjax.init(cache_config), jnp.zeros((1, 2), jnp.int32),
                      jnp.array([0]), jnp.array([2]), config=other, cache_config=cache_config)
