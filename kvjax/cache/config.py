"""Static cache configuration: frozen, hashable, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax.numpy as jnp

from kvjax.layout.spec import QuantSpec
from kvjax.policies.contract import get_policy
from kvjax.policies.contract import make_params
from kvjax.policies.contract import POLICIES
from kvjax.prefix.hashing import block_hash


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
    prefix_caching: full pages enter the prefix index (content-addressed by
      their chained block hash) and ``attach_prefix`` reuses them.
    namespace: model fingerprint that seeds every hash chain (with the adapter
      id and tenant salt given to ``attach_prefix``).
    index_capacity: slots of the prefix index (a power of two); default the
      smallest power of two >= 2 * num_pages.
    hash_fn: the block hash (static); ``None`` is ``block_hash``.
      Tests swap in one that always collides.
    eviction: the policy that ranks cached pages for eviction, by name from
      ``kvjax.policies`` (the scoring functions the simulator runs): any online
      policy; history arrays live in ``CacheState.policy`` and are fed by the
      cache's events (``kvjax.cache_policy``). The oracles (``min``) are refused.
    eviction_params: ``((name, value), ...)`` overrides of the policy's
      parameters, validated by ``kvjax.policies.make_params``: the initial values of
      ``CacheState.policy_params`` (change them without recompiling with
      ``kvjax.set_policy_params``).
    key_rope: 0 (default): keys are written as given (after RoPE). A RoPE base
      (theta) > 0: keys are written *before* RoPE and attention rotates the
      dequantized keys by their positions (rotate-half convention,
      ``kvjax.rope``): KVQuant's pre-RoPE key quantization, which keeps a key
      channel's values near the channel's own offset across a page (RoPE spins
      each channel pair by the position). The model must then write unrotated
      keys (``kvjax.models.decode_step`` does). Not with page dropping.

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
  prefix_caching: bool = True
  namespace: str = "kvjax"
  index_capacity: Optional[int] = None
  hash_fn: Optional[Callable] = None
  eviction: str = "lru"
  eviction_params: tuple = ()
  key_rope: float = 0.0

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
    cap = self.index_capacity
    if cap is not None and (not isinstance(cap, int) or cap <= 0 or cap & (cap - 1)
                            or cap < self.num_pages):
      raise ValueError(f"CacheConfig.index_capacity must be a power of two >= num_pages "
                       f"({self.num_pages}), got {cap!r}")
    for name in ("checked", "prefix_caching"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"CacheConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if not isinstance(self.namespace, str):
      raise ValueError(f"CacheConfig.namespace must be a str, got {self.namespace!r}")
    self._check_eviction()
    if (not isinstance(self.key_rope, (int, float)) or isinstance(self.key_rope, bool)
        or not math.isfinite(self.key_rope) or self.key_rope < 0):
      raise ValueError(f"CacheConfig.key_rope must be a RoPE base > 0 or 0 (off), "
                       f"got {self.key_rope!r}")
    if self.key_rope and self.head_dim % 2:
      raise ValueError(f"CacheConfig.key_rope needs an even head_dim, got {self.head_dim}")
    if self.hash_fn is not None and not callable(self.hash_fn):
      raise ValueError(f"CacheConfig.hash_fn must be callable or None, got {self.hash_fn!r}")

  def _check_eviction(self) -> None:
    policy = get_policy(self.eviction)
    if policy.oracle:
      raise ValueError(f"CacheConfig.eviction={self.eviction!r} is an offline oracle (it reads "
                       f"next-use times from a trace); the cache takes the online policies: "
                       f"{sorted(n for n, p in POLICIES.items() if not p.oracle)}")
    if not isinstance(self.eviction_params, tuple) or not all(
        isinstance(kv, tuple) and len(kv) == 2 for kv in self.eviction_params):
      raise ValueError(f"CacheConfig.eviction_params must be a tuple of (name, value) pairs, "
                       f"got {self.eviction_params!r}")
    make_params(policy, **dict(self.eviction_params))

  @property
  def max_seq_len(self) -> int:
    return self.page_size * self.max_pages_per_seq

  @property
  def index_slots(self) -> int:
    if self.index_capacity is not None:
      return self.index_capacity
    return 1 << max(1, (2 * self.num_pages - 1).bit_length())

  @property
  def block_hash_fn(self) -> Callable:
    return self.hash_fn if self.hash_fn is not None else block_hash

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)
