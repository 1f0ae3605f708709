"""``PageMeta``: the layer-independent record of every page (references, fill, tokens,
hash chain). Eviction policies score it; the cache's pool updates it.

Names in shapes: P = num_pages, S = page_size.

>>> init_meta(num_pages=3, page_size=2).tokens.tolist()
[[-1, -1], [-1, -1], [-1, -1]]
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
@struct.dataclass
class PageMeta:
  """Layer-independent metadata, one entry per page."""

  ref_count: jax.Array     # int32 [P]  live sequences holding the page (0 = evictable)
  last_access: jax.Array   # int32 [P]  logical clock of the last step that used it
  access_count: jax.Array  # int32 [P]  steps that used it
  block_hash: jax.Array    # uint32 [P, 2]  chained content hash, (0, 0) = none
  parent: jax.Array        # int32 [P]  page of the previous block (-1 at a sequence start)
  tokens: jax.Array        # int32 [P, S]  token ids written into the page (-1 = empty slot)
  position: jax.Array      # int32 [P]  block index in its sequence
  filled: jax.Array        # int32 [P]  tokens written (0 = empty page)
  namespace: jax.Array     # uint32 [P, 2]  chain seed of the sequence that filled the page


def init_meta(num_pages: int, page_size: int) -> PageMeta:
  """Metadata of ``num_pages`` empty pages."""
  return PageMeta(
      ref_count=jnp.zeros((num_pages,), jnp.int32),
      last_access=jnp.zeros((num_pages,), jnp.int32),
      access_count=jnp.zeros((num_pages,), jnp.int32),
      block_hash=jnp.zeros((num_pages, 2), jnp.uint32),
      parent=jnp.full((num_pages,), -1, jnp.int32),
      tokens=jnp.full((num_pages, page_size), -1, jnp.int32),
      position=jnp.zeros((num_pages,), jnp.int32),
      filled=jnp.zeros((num_pages,), jnp.int32),
      namespace=jnp.zeros((num_pages, 2), jnp.uint32),
  )
