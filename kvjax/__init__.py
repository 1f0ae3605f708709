"""kvjax: a functional, jittable paged KV cache for JAX LLM inference.

Cache state is an immutable pytree; every operation is a pure function that jits.
"""

from kvjax.policies import Admission
from kvjax.policies import Bound
from kvjax.policies import POLICIES
from kvjax.policies import Policy
from kvjax.policies import get_policy
from kvjax.policies import make_params
from kvjax.policies import score_and_evict
from kvjax.policies import with_admission
from kvjax import drop  # noqa: E402 (opt-in page dropping, kvjax.drop.*)
from kvjax.cache.attach import attach_prefix
from kvjax.cache.attach import tenant_seed
from kvjax.cache.attend import attend
from kvjax.cache.config import CacheConfig
from kvjax.cache.lifecycle import fork
from kvjax.cache.lifecycle import release
from kvjax.cache.plan import StepPlan
from kvjax.cache.plan import flag_sequences
from kvjax.cache.plan import plan_step
from kvjax.cache.plan import write_flags
from kvjax.cache.state import CacheState
from kvjax.cache.state import Stats
from kvjax.cache.state import clear_status
from kvjax.cache.state import init
from kvjax.cache.state import set_policy_params
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
from kvjax.cache.write import write
from kvjax.layout.meta import PageMeta
from kvjax.layout.pages import Pages
from kvjax.layout.spec import QuantSpec

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
    "Admission",
    "Bound",
    "POLICIES",
    "Policy",
    "get_policy",
    "make_params",
    "score_and_evict",
    "set_policy_params",
    "with_admission",
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
