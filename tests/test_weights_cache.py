"""The dequantized-weights cache of the GGUF loader: exact round trip, bad files ignored."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.models import gguf_loader
from kvjax.models.llama import LlamaConfig, init_params

CFG = LlamaConfig.small()


def _fake_gguf(tmp_path, monkeypatch):
  """A stand-in GGUF file and a read_params that counts its calls (the slow dequantize)."""
  path = tmp_path / "model.gguf"
  path.write_bytes(b"gguf stand-in")
  calls = []
  ref = init_params(CFG, jax.random.key(1))

  def read_params(reader, config, dtype):
    calls.append(dtype)
    return jax.tree.map(lambda a: a.astype(dtype), ref)

  monkeypatch.setattr(gguf_loader, "read_params", read_params)
  monkeypatch.setenv("KVJAX_WEIGHTS_CACHE", str(tmp_path / "cache"))
  return str(path), ref, calls


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_second_load_reads_the_cache_bit_exact(tmp_path, monkeypatch):
  path, ref, calls = _fake_gguf(tmp_path, monkeypatch)
  first = gguf_loader.cached_params(path, CFG, None, jnp.float32)
  second = gguf_loader.cached_params(path, CFG, None, jnp.float32)
  assert len(calls) == 1 and _equal(first, ref) and _equal(second, ref)
  bf16 = gguf_loader.cached_params(path, CFG, None, jnp.bfloat16)   # cast from the cache
  assert len(calls) == 1 and bf16.embed.dtype == jnp.bfloat16
  assert _equal(bf16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), ref))


def test_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(tmp_path, monkeypatch):
  path, ref, calls = _fake_gguf(tmp_path, monkeypatch)
  gguf_loader.cached_params(path, CFG, None, jnp.float32)
  (file,) = [os.path.join(tmp_path / "cache", f) for f in os.listdir(tmp_path / "cache")]
  with open(file, "r+b") as f:          # truncate: a torn or damaged file
    f.truncate(100)
  assert _equal(gguf_loader.cached_params(path, CFG, None, jnp.float32), ref)
  assert len(calls) == 2
  # weights of another shape under the same name (another model) are not served
  np.savez(file, **{f"a{i}": np.zeros(3) for i in range(len(jax.tree.leaves(ref)))})
  assert _equal(gguf_loader.cached_params(path, CFG, None, jnp.float32), ref)
  assert len(calls) == 3
  assert _equal(gguf_loader.cached_params(path, CFG, None, jnp.float32), ref) and len(calls) == 3


def test_a_changed_gguf_gets_a_new_cache_file_and_off_disables(tmp_path, monkeypatch):
  path, ref, calls = _fake_gguf(tmp_path, monkeypatch)
  gguf_loader.cached_params(path, CFG, None, jnp.float32)
  with open(path, "ab") as f:           # a replaced model file: new size and mtime
    f.write(b" changed")
  gguf_loader.cached_params(path, CFG, None, jnp.float32)
  assert len(calls) == 2 and len(os.listdir(tmp_path / "cache")) == 2
  monkeypatch.setenv("KVJAX_WEIGHTS_CACHE", "off")
  gguf_loader.cached_params(path, CFG, None, jnp.float32)
  gguf_loader.cached_params(path, CFG, None, jnp.float32)
  assert len(calls) == 4


def test_load_gguf_second_run_reads_config_and_tokenizer_from_the_cache(tmp_path, monkeypatch):
  # the GGUF reader (3.5 s for SmolLM2's vocabulary) runs once; later loads take the cache
  import gguf

  path, ref, calls = _fake_gguf(tmp_path, monkeypatch)
  opened = []
  monkeypatch.setattr(gguf, "GGUFReader", lambda p: opened.append(p) or "reader")
  monkeypatch.setattr(gguf_loader, "read_config", lambda reader: CFG)
  fields = (["a", "b", "ab", "<|im_end|>"], ["a b"], ["<|im_end|>"])
  monkeypatch.setattr(gguf_loader, "tokenizer_fields", lambda reader: fields)
  monkeypatch.setattr(gguf_loader, "build_tokenizer", lambda *f: f)
  # a cache file from before (weights, no metadata) is rewritten with the metadata
  gguf_loader.cached_params(path, CFG, None, jnp.float32)
  first = gguf_loader.load_gguf(path)
  assert len(opened) == 1 and len(calls) == 1       # parsed, not dequantized again
  second = gguf_loader.load_gguf(path, jnp.bfloat16)
  assert len(opened) == 1 and len(calls) == 1
  assert first[0] == second[0] == CFG and first[2] == second[2] == fields
  assert _equal(first[1], ref) and second[1].embed.dtype == jnp.bfloat16
  # a damaged file: parsed and dequantized again, never served
  (file,) = [os.path.join(tmp_path / "cache", f) for f in os.listdir(tmp_path / "cache")]
  with open(file, "r+b") as f:
    f.truncate(200)
  assert _equal(gguf_loader.load_gguf(path)[1], ref) and len(opened) == 2 and len(calls) == 2
