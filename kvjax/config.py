"""Static cache configuration: frozen, hashable, validated on construction."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.quant import QuantSpec

_DTYPES = ("float32", "bfloat16", "float16")


def _positive(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"CacheConfig.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Shapes and options of a paged KV cache; passed to jitted functions as static.

  Args:
    num_layers: transformer layers sharing the page table.
    num_kv_heads: key/value heads per layer.
    head_dim: size of one head.
    page_size: tokens per page.
    num_pages: pages in the pool (all layers share the page ids).
    max_seqs: sequence slots (rows of the page table).
    max_pages_per_seq: columns of the page table; a sequence holds at most
      ``page_size * max_pages_per_seq`` tokens.
    dtype: storage dtype of unquantized pages ("float32", "bfloat16", "float16").
    key_quant / value_quant: quantization of the stored K / V (default: none).
    checked: opt-in checked mode; a step that sets a status flag raises.

  >>> cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4,
  ...                   num_pages=16, max_seqs=4, max_pages_per_seq=8)
  >>> cfg.max_seq_len
  32
  """

  num_layers: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  num_pages: int
  max_seqs: int
  max_pages_per_seq: int
  dtype: str = "float32"
  key_quant: QuantSpec = QuantSpec()
  value_quant: QuantSpec = QuantSpec()
  checked: bool = False

  def __post_init__(self):
    for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "num_pages",
                 "max_seqs", "max_pages_per_seq"):
      _positive(name, getattr(self, name))
    if self.dtype not in _DTYPES:
      raise ValueError(f"CacheConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
    for name in ("key_quant", "value_quant"):
      spec = getattr(self, name)
      if not isinstance(spec, QuantSpec):
        raise ValueError(f"CacheConfig.{name} must be a QuantSpec, got {spec!r}")
      spec.validate_for(head_dim=self.head_dim, page_size=self.page_size, what=name)

  @property
  def max_seq_len(self) -> int:
    return self.page_size * self.max_pages_per_seq

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)
