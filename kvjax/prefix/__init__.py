"""Content addressing for prefix reuse: chained block hashes (``hashing``) and the
jittable hash index with verified matching (``index``). Knows nothing of the cache state.

>>> import jax.numpy as jnp
>>> from kvjax.prefix import chain_hashes
>>> chain_hashes(jnp.zeros(2, jnp.uint32), jnp.arange(4), page_size=2).shape
(2, 2)
"""

from __future__ import annotations

from kvjax.prefix.hashing import block_hash
from kvjax.prefix.hashing import chain_hashes
from kvjax.prefix.hashing import fmix32
from kvjax.prefix.hashing import HashFn
from kvjax.prefix.hashing import namespace_seed
from kvjax.prefix.hashing import NO_HASH
from kvjax.prefix.hashing import page_hashes
from kvjax.prefix.hashing import remap_no_hash
from kvjax.prefix.hashing import ZERO_REMAP
from kvjax.prefix.index import BUCKET_SIZE
from kvjax.prefix.index import EMPTY
from kvjax.prefix.index import halfsiphash64
from kvjax.prefix.index import home_buckets
from kvjax.prefix.index import index_counts
from kvjax.prefix.index import index_delete
from kvjax.prefix.index import index_init
from kvjax.prefix.index import index_insert
from kvjax.prefix.index import index_lookup
from kvjax.prefix.index import index_rebuild
from kvjax.prefix.index import match_prefix
from kvjax.prefix.index import MAX_PROBES
from kvjax.prefix.index import PrefixIndex
from kvjax.prefix.index import PrefixMatch
from kvjax.prefix.index import process_key
from kvjax.prefix.index import TOMBSTONE
