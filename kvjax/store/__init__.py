"""The L3 tier's page store: ``BlockStore`` (persistent, checksummed pages on tensorstore,
keyed by block hash, warm on restart), its ``PageFormat``, the tiers' ``WritePolicy``, and
the ``Prefetcher`` (reads ahead of need into a bounded host buffer). Host side only.

>>> from kvjax.store import WritePolicy
>>> WritePolicy("write_back").wants("insert")
False
"""

from __future__ import annotations

from kvjax.store.format import Field
from kvjax.store.format import page_arrays
from kvjax.store.format import PageFormat
from kvjax.store.index import FutureLedger
from kvjax.store.index import lfu_score
from kvjax.store.index import lru_score
from kvjax.store.index import PersistentIndex
from kvjax.store.policy import WritePolicy
from kvjax.store.prefetch import POLICIES
from kvjax.store.prefetch import Prefetcher
from kvjax.store.prefetch import PrefetchPolicy
from kvjax.store.store import BlockStore
from kvjax.store.store import hash_keys
from kvjax.store.store import PageInfo
from kvjax.store.store import PendingRead
from kvjax.store.store import StoreConfig
from kvjax.store.store import StoreRead
from kvjax.store.store import StoreBusyError
from kvjax.store.store import StoreWriteError
