"""kvjax.models: a Llama-style decoder whose jitted decode step threads the cache."""
