"""The paged cache: its config, its state, and the pure functions that step it.

``init`` builds a ``CacheState``; ``plan_step`` gives a step's tokens pages and slots
(through the pool, ``kvjax.cache.pool``, the one place pages are taken, freed and
evicted); ``write_attend`` (or ``write`` then ``attend``, the same path) is the
per-layer data path, on the pages ``layer_pages`` takes out and ``with_layer_pages``
puts back; ``attach_prefix`` reuses cached prefixes; ``release`` and ``fork`` end
and copy sequences (and their page-dropping state, ``kvjax.drop``).

>>> import jax.numpy as jnp
>>> from kvjax.cache import CacheConfig, init, plan_step
>>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
...                   num_pages=4, max_seqs=2, max_pages_per_seq=2)
>>> plan, st = plan_step(init(cfg), jnp.array([0]), jnp.array([[5, 6, 7]]), jnp.array([3]),
...                      config=cfg)
>>> st.seq_lens.tolist()
[3, 0]
"""

from __future__ import annotations

from kvjax.cache.attach import attach_prefix
from kvjax.cache.attach import register_full_pages
from kvjax.cache.attach import tenant_seed
from kvjax.cache.attend import attend
from kvjax.cache.attend import Attended
from kvjax.cache.attend import Attention
from kvjax.cache.attend import dense_pages
from kvjax.cache.attend import grouped_attention
from kvjax.cache.attend import write_attend
from kvjax.cache.checks import as_int32
from kvjax.cache.checks import bad_rows
from kvjax.cache.checks import check_int
from kvjax.cache.checks import check_plan_inputs
from kvjax.cache.checks import check_state
from kvjax.cache.checks import dedupe
from kvjax.cache.config import CacheConfig
from kvjax.cache.invariants import check_invariants
from kvjax.cache.invariants import invariant_violations
from kvjax.cache.invariants import InvariantError
from kvjax.cache.lifecycle import fork
from kvjax.cache.lifecycle import release
from kvjax.cache.plan import flag_sequences
from kvjax.cache.plan import plan_step
from kvjax.cache.plan import StepPlan
from kvjax.cache.plan import write_flags
from kvjax.cache.pool import cached
from kvjax.cache.pool import eviction_scores
from kvjax.cache.pool import forget_pages
from kvjax.cache.pool import grant
from kvjax.cache.pool import ORPHAN
from kvjax.cache.pool import reclaim
from kvjax.cache.pool import Reclaimed
from kvjax.cache.pool import unref_pages
from kvjax.cache.pool import victims
from kvjax.cache.state import CacheState
from kvjax.cache.state import clear_status
from kvjax.cache.state import default_seed
from kvjax.cache.state import DropState
from kvjax.cache.state import init
from kvjax.cache.state import init_pages
from kvjax.cache.state import layer_pages
from kvjax.cache.state import row_seeds
from kvjax.cache.state import set_policy_params
from kvjax.cache.state import Stats
from kvjax.cache.state import with_layer_pages
from kvjax.cache.status import BAD_INPUT
from kvjax.cache.status import CacheStatusError
from kvjax.cache.status import check_status
from kvjax.cache.status import checked
from kvjax.cache.status import enforce_checked
from kvjax.cache.status import flagged_rows
from kvjax.cache.status import INDEX_OVERFLOW
from kvjax.cache.status import is_traced
from kvjax.cache.status import NON_FINITE
from kvjax.cache.status import OUT_OF_PAGES
from kvjax.cache.status import OUT_OF_RANGE
from kvjax.cache.status import SEQ_FULL
from kvjax.cache.status import status_error
from kvjax.cache.status import STATUS_NAMES
from kvjax.cache.status import status_names
from kvjax.cache.write import lens_before
from kvjax.cache.write import sink_rows
from kvjax.cache.write import stage_rows
from kvjax.cache.write import write
