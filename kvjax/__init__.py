"""kvjax: a functional, jittable paged KV cache for JAX LLM inference.

The cache state is an immutable pytree and every operation is a pure function
that jits. This namespace holds what a user loop needs; each subpackage
exports its own (``kvjax.layout``, ``kvjax.quant``, ``kvjax.prefix``,
``kvjax.policies``, ``kvjax.cache``, ``kvjax.kernels``, ``kvjax.models``,
``kvjax.sim``) and ``kvjax.pressure``, ``kvjax.drop`` and ``kvjax.sharding``
are modules of their own. docs/ARCHITECTURE.md maps the layers.

>>> import jax.numpy as jnp
>>> import kvjax
>>> cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
...                         num_pages=4, max_seqs=2, max_pages_per_seq=2)
>>> plan, cache = kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.array([[5, 6, 7]]),
...                               jnp.array([3]), config=cfg)
>>> cache.seq_lens.tolist(), kvjax.status_names(cache.status)
([3, 0], [])
"""

# Configuration and state.
from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
from kvjax.cache.state import Stats
from kvjax.cache.state import init
from kvjax.cache.state import set_policy_params
from kvjax.cache.state import layer_pages
from kvjax.cache.state import with_layer_pages
from kvjax.layout.meta import PageMeta
from kvjax.layout.pages import Pages
from kvjax.layout.presets import PRESETS
from kvjax.layout.spec import QuantSpec

# A step: plan the pages, then per layer write and attend.
from kvjax.cache.attend import Attended
from kvjax.cache.attend import Attention
from kvjax.cache.attend import attend
from kvjax.cache.attend import write_attend
from kvjax.cache.plan import StepPlan
from kvjax.cache.plan import flag_sequences
from kvjax.cache.plan import plan_step
from kvjax.cache.plan import write_flags
from kvjax.cache.write import write

# Sequences: prefixes, release, fork.
from kvjax.cache.attach import attach_prefix
from kvjax.cache.attach import tenant_seed
from kvjax.cache.lifecycle import fork
from kvjax.cache.lifecycle import release

# Status flags, checked mode, invariants.
from kvjax.cache.invariants import InvariantError
from kvjax.cache.invariants import check_invariants
from kvjax.cache.state import clear_status
from kvjax.cache.status import BAD_INPUT
from kvjax.cache.status import CacheStatusError
from kvjax.cache.status import INDEX_OVERFLOW
from kvjax.cache.status import NON_FINITE
from kvjax.cache.status import OUT_OF_PAGES
from kvjax.cache.status import OUT_OF_RANGE
from kvjax.cache.status import SEQ_FULL
from kvjax.cache.status import check_status
from kvjax.cache.status import checked
from kvjax.cache.status import flagged_rows
from kvjax.cache.status import status_names

# Memory pressure, page dropping, sharding.
from kvjax.pressure import PressureConfig
from kvjax.pressure import relieve
from kvjax.sharding import page_mesh
from kvjax.sharding import shard_cache
from kvjax import drop

# Eviction policies.
from kvjax.policies import POLICIES
from kvjax.policies import get_policy
from kvjax.policies import make_params

__version__ = "0.1.0"

__all__ = [
    "Attended",
    "Attention",
    "layer_pages",
    "with_layer_pages",
    "BAD_INPUT",
    "CacheConfig",
    "CacheState",
    "CacheStatusError",
    "INDEX_OVERFLOW",
    "InvariantError",
    "NON_FINITE",
    "OUT_OF_PAGES",
    "OUT_OF_RANGE",
    "POLICIES",
    "PRESETS",
    "PageMeta",
    "Pages",
    "PressureConfig",
    "QuantSpec",
    "SEQ_FULL",
    "Stats",
    "StepPlan",
    "attach_prefix",
    "attend",
    "check_invariants",
    "check_status",
    "checked",
    "clear_status",
    "drop",
    "flag_sequences",
    "flagged_rows",
    "fork",
    "get_policy",
    "init",
    "make_params",
    "page_mesh",
    "plan_step",
    "release",
    "relieve",
    "set_policy_params",
    "shard_cache",
    "status_names",
    "tenant_seed",
    "write",
    "write_attend",
    "write_flags",
]
