"""Trace-time argument checks shared by the cache's operations.

Shape, dtype and config errors raise ``ValueError`` naming the argument and
the values; these run once per trace, never on device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
def check_int(name: str, x, ndim: int) -> None:
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")


_INT32_MAX = 2 ** 31 - 1


def as_int32(name: str, x, ndim: int) -> jax.Array:
  """``x`` checked (integer dtype, ``ndim`` dims; ``ValueError`` naming ``name`` otherwise)
  and cast to int32.

  Any integer dtype is accepted: values outside int32 saturate (so an unsigned
  or 64-bit id too large for the cache stays out of range and is refused, never
  wrapped onto another slot or onto -1).

  >>> as_int32("seq_ids", jnp.array([0, 4294967295], jnp.uint32), 1).tolist()
  [0, 2147483647]
  """
  x = jnp.asarray(x)
  check_int(name, x, ndim)
  if x.dtype == jnp.int32:
    return x
  info = jnp.iinfo(x.dtype)
  lo = max(int(info.min), -_INT32_MAX - 1)
  hi = min(int(info.max), _INT32_MAX)
  if lo > info.min or hi < info.max:
    x = jnp.clip(x, jnp.asarray(lo, x.dtype), jnp.asarray(hi, x.dtype))
  return x.astype(jnp.int32)


def check_plan_inputs(seq_ids, tokens, num_new) -> tuple[int, int]:
  b = seq_ids.shape[0]
  if tokens.shape[0] != b or num_new.shape[0] != b:
    raise ValueError(
        f"seq_ids, tokens and num_new must share the batch size; got seq_ids {tuple(seq_ids.shape)}, "
        f"tokens {tuple(tokens.shape)}, num_new {tuple(num_new.shape)}")
  if tokens.shape[1] == 0:
    raise ValueError(f"tokens must have at least one column, got shape {tuple(tokens.shape)}")
  return b, tokens.shape[1]


def check_state(state: CacheState, config: CacheConfig) -> None:
  if not isinstance(config, CacheConfig):
    raise ValueError(f"config must be a CacheConfig, got {type(config).__name__}")
  want = (config.max_seqs, config.max_pages_per_seq)
  if tuple(state.page_table.shape) != want:
    raise ValueError(f"state.page_table has shape {tuple(state.page_table.shape)} but config "
                     f"gives (max_seqs, max_pages_per_seq) = {want}")
  if state.meta.ref_count.shape != (config.num_pages,):
    raise ValueError(f"state has {state.meta.ref_count.shape[0]} pages but config.num_pages = "
                     f"{config.num_pages}")
  for name, pages in (("k", state.k), ("v", state.v)):
    if pages.written is not None or pages.ring_before is not None:
      raise ValueError(f"state.{name} carries the step fields write attaches for attend (written, "
                       f"ring_before): put layers back with kvjax.cache.with_layer_pages, or "
                       f"drop them with kvjax.layout.as_stored")


def bad_rows(seq_ids: jax.Array, num_new: jax.Array, t: int, max_seqs: int) -> jax.Array:
  """Rows with an out-of-range id, an id repeated in the batch, or num_new outside [0, T]."""
  in_range = (seq_ids >= 0) & (seq_ids < max_seqs)
  out_of_range = (seq_ids < -1) | (seq_ids >= max_seqs)
  same = (seq_ids[:, None] == seq_ids[None, :]) & in_range[:, None] & in_range[None, :]
  dup = jnp.sum(same, axis=1) > 1
  bad_len = in_range & ((num_new < 0) | (num_new > t))
  return out_of_range | dup | bad_len


def dedupe(ids: jax.Array, bound: int) -> jax.Array:
  """bool [N]: ids in [0, bound) that are the first occurrence in the batch."""
  ok = (ids >= 0) & (ids < bound)
  earlier = (ids[:, None] == ids[None, :]) & jnp.tril(jnp.ones((ids.size, ids.size), bool), -1)
  return ok & ~jnp.any(earlier, axis=1)
