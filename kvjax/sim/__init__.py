"""kvjax.sim: trace loading, a jitted cache simulator and the Belady oracle."""
