"""kvjax.sim: trace loading, a jitted cache simulator and the Belady oracle."""

from kvjax.sim.simulator import hit_ratio
from kvjax.sim.simulator import prefix_hits
from kvjax.sim.simulator import simulate
from kvjax.sim.simulator import simulate_hits
from kvjax.sim.traces import Trace
from kvjax.sim.traces import default_trace_path
from kvjax.sim.traces import from_requests
from kvjax.sim.traces import generate
from kvjax.sim.traces import load_mooncake

__all__ = [
    "hit_ratio",
    "prefix_hits",
    "simulate",
    "simulate_hits",
    "Trace",
    "default_trace_path",
    "from_requests",
    "generate",
    "load_mooncake",
]
