"""Eviction policies as pure scoring functions over page metadata.

A policy is a ``Policy`` bundle of pure functions (optax-style; configuration in the
closure, arrays in the state):

* ``init(num_pages) -> state``: the policy's own history (a small pytree; ``()`` if none).
* ``score(meta, state, clock, params) -> float32[P]``: higher = evict first; pages with
  ``ref_count > 0`` score ``-inf`` (never candidates), empty pages ``+inf``.
* ``update(state, meta, access, params) -> state``: after each reference (``Access``).
* ``admit(state, meta, access, victim, params) -> bool[]`` or None: may a missing block
  take the victim's page? (None = always.) A declined block bypasses the cache.

The same functions run in the real cache and in ``kvjax.sim``. ``params`` is a dict of
float32 scalars (so ``vmap`` can sweep them); ``make_params`` validates it.

Modules: ``base`` (``Policy``, the registry, ``make_params``, ``score_and_evict``),
``classic`` (LRU, FIFO, LRU-2, LFU, S3-FIFO, weighted, GreedyDual, LeCaR), ``frequency``
(TinyLFU, ``freqlru``, ``autofreq``, ``classfreq``, ``autoclass``), ``oracle`` (MIN).
Every public name is re-exported here; the policies are registered here, in this order.

>>> get_policy("lru").oracle, get_policy("min").oracle   # the cache takes online policies only
(False, True)
>>> sorted(make_params(get_policy("lru")))               # lru has no parameters
[]
"""

from __future__ import annotations

from kvjax.policies.classic import (  # noqa: F401
    lru_score,
    FifoState,
    _fifo_init,
    _fifo_score,
    _fifo_update,
    Lru2State,
    _lru2_init,
    _lru2_score,
    _lru2_update,
    LfuState,
    lfu_state,
    _lfu_init,
    _lfu_log_freq,
    _lfu_score,
    _lfu_update,
    S3FifoState,
    s3fifo_state,
    _s3fifo_init,
    _s3fifo_score,
    _s3fifo_update,
    weighted_score,
    GreedyDualState,
    greedydual_state,
    _gd_init,
    recompute_cost,
    _gd_score,
    _gd_update,
    LecarState,
    _lecar_init,
    _lecar_score,
    _lecar_update)
from kvjax.policies.oracle import (  # noqa: F401
    MinState,
    min_state,
    _min_init,
    _min_score,
    _min_update,
    _min_admit)
from kvjax.policies.frequency import (  # noqa: F401
    _SKETCH_ROWS,
    _SKETCH_MAX,
    TinyLfuState,
    _sketch_cells,
    _sketch_estimate,
    with_tinylfu,
    GHOST_FACTOR,
    FreqLruState,
    freqlru_state,
    _freqlru_init,
    _freqlru_score,
    _freqlru_update,
    _freqlru_admit,
    MINI_CREDITS,
    MINI_RATE,
    AutoFreqLruState,
    _mini_size,
    _auto_init,
    auto_credit,
    _auto_score,
    _auto_update,
    _auto_admit,
    REUSE_CLASSES,
    CLASS_PRIOR,
    ClassFreqState,
    classfreq_state,
    _classfreq_init,
    first_seen_class,
    class_bonus,
    _classfreq_score,
    _classfreq_update,
    _classfreq_admit,
    AUTOCLASS_SCALES,
    autoclass_credits,
    _autoclass_init,
    _autoclass_score,
    _autoclass_update)
from kvjax.policies.contract import POLICIES
from kvjax.policies.contract import Policy
from kvjax.policies.contract import _OPEN
from kvjax.policies.contract import _WEIGHT
from kvjax.policies.contract import _no_state
from kvjax.policies.contract import _no_update
from kvjax.policies.contract import _stateless
from kvjax.policies.contract import get_policy
from kvjax.policies.contract import make_params
from kvjax.policies.contract import register
from kvjax.policies.contract import score_and_evict

register(Policy("lru", _no_state, _stateless(lru_score), _no_update, None, {}, {}))
register(Policy("fifo", _fifo_init, _fifo_score, _fifo_update, None, {}, {}))
register(Policy("lru2", _lru2_init, _lru2_score, _lru2_update, None, {}, {}))
register(Policy("lfu", _lfu_init, _lfu_score, _lfu_update, None, {"half_life": 4096.0},
                {"half_life": _OPEN}))
register(Policy("s3fifo", _s3fifo_init, _s3fifo_score, _s3fifo_update, None,
                {"small_frac": 0.1, "partial_bias": 0.0},
                {"small_frac": (0.0, 1.0, True, True), "partial_bias": (0.0, 1.0, False, False)}))
register(Policy("weighted", _no_state, _stateless(weighted_score), _no_update, None,
                {"w_age": 1.0, "w_freq": 1.0, "w_size": 0.0, "w_cost": 0.0, "w_context": 0.0,
                 "age_scale": 4096.0},
                {"w_age": _WEIGHT, "w_freq": _WEIGHT, "w_size": _WEIGHT, "w_cost": _WEIGHT,
                 "w_context": _WEIGHT, "age_scale": _OPEN}))
register(Policy("greedydual", _gd_init, _gd_score, _gd_update, None,
                {"pos_weight": 0.05, "freq_exp": 1.0},
                {"pos_weight": (0.0, 100.0, False, False), "freq_exp": (0.0, 4.0, False, False)}))
register(Policy("lecar", _lecar_init, _lecar_score, _lecar_update, None,
                {"half_life": 4096.0, "regret_half_life": 4096.0, "learning_rate": 0.45},
                {"half_life": _OPEN, "regret_half_life": _OPEN,
                 "learning_rate": (0.0, 10.0, True, False)}))
register(with_tinylfu(POLICIES["lru"], "tinylfu"))
register(with_tinylfu(POLICIES["s3fifo"]))
register(Policy("freqlru", _freqlru_init, _freqlru_score, _freqlru_update, _freqlru_admit,
                {"credit": 24576.0, "admit_partial": 0.0},
                {"credit": (0.0, 1e8, False, False), "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("autofreq", _auto_init, _auto_score, _auto_update, _auto_admit,
                {"window": 8.0, "admit_partial": 0.0},
                {"window": (0.0, 1e6, True, False), "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("classfreq", _classfreq_init, _classfreq_score, _classfreq_update,
                _classfreq_admit,
                {"credit": 16384.0, "interval_weight": 4096.0, "interval_scale": 2.0,
                 "admit_partial": 0.0},
                {"credit": (0.0, 1e8, False, False), "interval_weight": (0.0, 1e8, False, False),
                 "interval_scale": (0.0, 1e6, True, False),
                 "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("autoclass", _autoclass_init, _autoclass_score, _autoclass_update,
                _auto_admit,
                {"credit": 16384.0, "window": 8.0, "interval_frac": 0.25, "interval_scale": 2.0,
                 "admit_partial": 0.0},
                {"credit": (0.0, 1e8, False, False), "window": (0.0, 1e6, True, False),
                 "interval_frac": (0.0, 100.0, False, False),
                 "interval_scale": (0.0, 1e6, True, False),
                 "admit_partial": (0.0, 1.0, False, False)}))
register(Policy("min", _min_init, _min_score, _min_update, None, {}, {}, oracle=True))
register(Policy("min-bypass", _min_init, _min_score, _min_update, _min_admit, {}, {},
                oracle=True))

__all__ = [
    "AUTOCLASS_SCALES",
    "AutoFreqLruState",
    "CLASS_PRIOR",
    "ClassFreqState",
    "FifoState",
    "FreqLruState",
    "GHOST_FACTOR",
    "GreedyDualState",
    "LecarState",
    "LfuState",
    "Lru2State",
    "MINI_CREDITS",
    "MINI_RATE",
    "MinState",
    "POLICIES",
    "Policy",
    "REUSE_CLASSES",
    "S3FifoState",
    "TinyLfuState",
    "auto_credit",
    "autoclass_credits",
    "class_bonus",
    "classfreq_state",
    "first_seen_class",
    "freqlru_state",
    "get_policy",
    "greedydual_state",
    "lfu_state",
    "lru_score",
    "make_params",
    "min_state",
    "recompute_cost",
    "register",
    "s3fifo_state",
    "score_and_evict",
    "weighted_score",
    "with_tinylfu",
]
