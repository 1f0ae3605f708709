"""Perplexity of a model on independent windows of a token stream (no cache, no BOS).

The standard text is CPython's ``pydoc_data.topics`` (shipped with every
CPython): its topics joined by blank lines in key order.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from kvjax.models.llama import LlamaConfig
from kvjax.models.llama import LlamaParams
from kvjax.models.llama import token_nll


def pydoc_topics_text() -> str:
  """The text of ``pydoc_data.topics``: topics joined by "\\n\\n" in sorted key order.

  >>> len(pydoc_topics_text()) > 100_000
  True
  """
  from pydoc_data import topics

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def pydoc_windows(tokenizer, window: int, num_windows: int) -> np.ndarray:
  """int32 [num_windows, window]: the standard text's tokens (no special tokens), the
  first ``window * num_windows`` cut into consecutive windows — the tokens of the
  foundation's perplexity figure and of the quality and page-dropping benchmarks.

  Args:
    tokenizer: the model's tokenizer (``encode(text, add_special_tokens=False).ids``).
    window, num_windows: window length and count (the text has ~40k SmolLM2 tokens).

  >>> class Chars:  # a stand-in tokenizer: one token per character
  ...   def encode(self, text, add_special_tokens=False):
  ...     return type("Enc", (), {"ids": [ord(c) for c in text]})()
  >>> pydoc_windows(Chars(), 8, 3).shape
  (3, 8)
  """
  ids = tokenizer.encode(pydoc_topics_text(), add_special_tokens=False).ids
  need = window * num_windows
  if len(ids) < need:
    raise ValueError(f"num_windows x window = {need} tokens, but the text has {len(ids)}")
  return np.asarray(ids[:need], np.int32).reshape(num_windows, window)


def window_nll(params: LlamaParams, config: LlamaConfig, token_ids: Sequence[int], *,
               window: int, num_windows: int) -> np.ndarray:
  """Next-token NLLs of ``num_windows`` independent windows of ``window`` tokens.

  Window i is ``token_ids[i*window:(i+1)*window]``, run alone (no state carried
  across windows, no BOS added). One jitted forward per window; only the NLLs
  leave the device.

  Args:
    params, config: the model.
    token_ids: at least ``window * num_windows`` ids.
    window: tokens per window (>= 2).
    num_windows: windows to score.

  Returns:
    float64 [num_windows, window - 1].

  >>> from kvjax.models.llama import init_params
  >>> import jax
  >>> cfg = LlamaConfig.small()
  >>> window_nll(init_params(cfg, jax.random.key(0)), cfg, list(range(8)),
  ...            window=4, num_windows=2).shape
  (2, 3)
  """
  if window < 2:
    raise ValueError(f"window must be >= 2, got {window}")
  if num_windows < 1:
    raise ValueError(f"num_windows must be >= 1, got {num_windows}")
  need = window * num_windows
  if len(token_ids) < need:
    raise ValueError(f"token_ids: need {need} tokens for {num_windows} windows of {window}, "
                     f"got {len(token_ids)}")
  ids = np.asarray(token_ids[:need], np.int32).reshape(num_windows, window)
  out = np.empty((num_windows, window - 1), np.float64)
  for i in range(num_windows):
    out[i] = np.asarray(token_nll(params, jnp.asarray(ids[i:i + 1]), config))[0]
  return out


def perplexity(params: LlamaParams, config: LlamaConfig, token_ids: Sequence[int], *,
               window: int = 1024, num_windows: int = 16) -> float:
  """exp(mean next-token NLL) over ``num_windows`` independent windows (see ``window_nll``).

  >>> perplexity(params, config, ids, window=1024, num_windows=16)  # doctest: +SKIP
  12.87...
  """
  return float(math.exp(window_nll(params, config, token_ids, window=window,
                                   num_windows=num_windows).mean()))
