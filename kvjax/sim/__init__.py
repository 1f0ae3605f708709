"""kvjax.sim: trace loading, a jitted cache simulator and the Belady oracle.

>>> trace = generate(200, seed=0)              # a small synthetic conversation trace
>>> ratios = simulate(trace, [64, 4096], "lru")  # block hit ratio per capacity
>>> 0 < ratios[64] < ratios[4096] <= 1
True
"""

from kvjax.sim.simulator import hit_ratio
from kvjax.sim.simulator import prefix_hits
from kvjax.sim.simulator import simulate
from kvjax.sim.simulator import simulate_hits
from kvjax.sim.simulator import sweep
from kvjax.sim.traces import default_trace_path
from kvjax.sim.traces import from_requests
from kvjax.sim.traces import generate
from kvjax.sim.traces import load_mooncake
from kvjax.sim.traces import Trace

__all__ = [
    "hit_ratio",
    "prefix_hits",
    "simulate",
    "simulate_hits",
    "sweep",
    "Trace",
    "default_trace_path",
    "from_requests",
    "generate",
    "load_mooncake",
]
