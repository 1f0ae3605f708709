"""kvjax: a functional, jittable paged KV cache for JAX LLM inference.

Cache state is an immutable pytree; every operation is a pure function that jits.
"""

from kvjax.attention import attend
from kvjax.config import CacheConfig
from kvjax.paging import StepPlan
from kvjax.paging import flag_sequences
from kvjax.paging import fork
from kvjax.paging import plan_step
from kvjax.paging import release
from kvjax.paging import write
from kvjax.paging import write_flags
from kvjax.policies import POLICIES
from kvjax.policies import Policy
from kvjax.policies import get_policy
from kvjax.policies import make_params
from kvjax.policies import score_and_evict
from kvjax.prefix import attach_prefix
from kvjax.prefix import tenant_seed
from kvjax.quant import QuantSpec
from kvjax.state import BAD_INPUT
from kvjax.state import CacheState
from kvjax.state import CacheStatusError
from kvjax.state import INDEX_OVERFLOW
from kvjax.state import NON_FINITE
from kvjax.state import OUT_OF_RANGE
from kvjax.state import OUT_OF_PAGES
from kvjax.state import PageMeta
from kvjax.state import Pages
from kvjax.state import SEQ_FULL
from kvjax.state import Stats
from kvjax.state import check_status
from kvjax.state import checked
from kvjax.state import clear_status
from kvjax.state import flagged_rows
from kvjax.state import init
from kvjax.state import status_names
from kvjax import drop  # noqa: E402 (opt-in page dropping, kvjax.drop.*)

__version__ = "0.1.0"

__all__ = [
    "attend",
    "CacheConfig",
    "StepPlan",
    "flag_sequences",
    "fork",
    "plan_step",
    "release",
    "write",
    "write_flags",
    "POLICIES",
    "Policy",
    "get_policy",
    "make_params",
    "score_and_evict",
    "attach_prefix",
    "tenant_seed",
    "QuantSpec",
    "BAD_INPUT",
    "CacheState",
    "CacheStatusError",
    "INDEX_OVERFLOW",
    "NON_FINITE",
    "OUT_OF_RANGE",
    "OUT_OF_PAGES",
    "PageMeta",
    "Pages",
    "SEQ_FULL",
    "Stats",
    "check_status",
    "checked",
    "clear_status",
    "flagged_rows",
    "init",
    "status_names",
    "drop",
]
