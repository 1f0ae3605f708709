"""The L2 tier: a second page pool that L1's cached pages are demoted to and promoted from.

``init(config, tiers)`` builds a ``TieredState`` (L1 ``CacheState`` + ``L2State`` +
``TierStats``); ``plan_step`` / ``attach_prefix`` / ``release`` / ``fork`` /
``relieve`` / ``swap_out`` / ``swap_in`` are host wrappers around L1's jitted ops and
the jitted page moves (``kvjax.tiers.move``); ``check_tiers`` checks the invariants.
See docs/tiers.md ("L2").

>>> TierConfig(l2_pages=4, l2_preset="bf16").l2_key_quant.is_quantized
False
"""

from __future__ import annotations

from kvjax.tiers.config import TierConfig
from kvjax.tiers.invariants import check_tiers
from kvjax.tiers.invariants import tier_violations
from kvjax.tiers.l3 import L3Config
from kvjax.tiers.l3 import L3Tier
from kvjax.tiers.l3 import with_l3
from kvjax.tiers.ops import attach_prefix
from kvjax.tiers.ops import fork
from kvjax.tiers.ops import plan_step
from kvjax.tiers.ops import precompile
from kvjax.tiers.ops import release
from kvjax.tiers.ops import relieve
from kvjax.tiers.ops import swap_in
from kvjax.tiers.ops import swap_out
from kvjax.tiers.ops import sync
from kvjax.tiers.state import hit_ratios
from kvjax.tiers.state import init
from kvjax.tiers.state import L2State
from kvjax.tiers.state import TieredState
from kvjax.tiers.state import TierStats
