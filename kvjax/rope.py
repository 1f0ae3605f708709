"""Rotary position embedding (RoPE), rotate-half convention (Llama, SmolLM2).

In ``kvjax`` itself because a cache that stores keys before RoPE
(``CacheConfig.key_rope``, KVQuant's pre-RoPE key quantization) rotates them
at attention time; ``kvjax.models`` uses the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_freq(head_dim: int, base: float) -> jax.Array:
  """float32 ``[D/2]`` rotation frequencies ``base ** (-2i / D)``.

  >>> inv_freq(4, 10000.0).tolist()
  [1.0, 0.009999999776482582]
  """
  return 1.0 / (base ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim))


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding, rotate-half convention.

  Args:
    x: [B, T, heads, D].
    positions: int32 [B, T], absolute position of each token.
    base: frequency base (theta).

  Returns:
    [B, T, heads, D]: ``x[..., i]`` and ``x[..., i + D/2]`` rotated by
    ``positions * base**(-2i/D)``.

  >>> rope(jnp.ones((1, 1, 1, 4)), jnp.zeros((1, 1), jnp.int32), 10000.0).tolist()
  [[[[1.0, 1.0, 1.0, 1.0]]]]
  """
  d = x.shape[-1]
  angle = positions.astype(jnp.float32)[..., None] * inv_freq(d, base)  # [B, T, D/2]
  cos = jnp.cos(angle)[:, :, None, :]
  sin = jnp.sin(angle)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
