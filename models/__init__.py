"""kvjax.models: a Llama-style decoder whose jitted decode step threads the cache.

>>> from kvjax.models import LlamaConfig, init_params, forward
>>> import jax, jax.numpy as jnp
>>> cfg = LlamaConfig.small()
>>> forward(init_params(cfg, jax.random.key(0)), jnp.zeros((1, 2), jnp.int32), cfg).shape
(1, 2, 256)
"""

from kvjax.models.generate import generate
from kvjax.models.generate import prefill
from kvjax.models.generate import Reply
from kvjax.models.gguf_loader import load_gguf
from kvjax.models.gguf_loader import load_smollm2
from kvjax.models.gguf_loader import smollm2_available
from kvjax.models.gguf_loader import smollm2_path
from kvjax.models.gguf_loader import WeightsNotInstalledError
from kvjax.models.llama import check_params
from kvjax.models.llama import decode_step
from kvjax.models.llama import forward
from kvjax.models.llama import init_params
from kvjax.models.llama import LayerParams
from kvjax.models.llama import LlamaConfig
from kvjax.models.llama import LlamaParams
from kvjax.models.llama import token_nll
from kvjax.models.perplexity import perplexity
from kvjax.models.perplexity import pydoc_topics_text
from kvjax.models.perplexity import window_nll
from kvjax.models.tokenizer import chat_prompt
from kvjax.models.tokenizer import encode_chat
from kvjax.models.tokenizer import IM_END_ID

__all__ = [
    "generate",
    "prefill",
    "Reply",
    "WeightsNotInstalledError",
    "load_gguf",
    "load_smollm2",
    "smollm2_available",
    "smollm2_path",
    "LayerParams",
    "LlamaConfig",
    "LlamaParams",
    "check_params",
    "decode_step",
    "forward",
    "init_params",
    "token_nll",
    "perplexity",
    "pydoc_topics_text",
    "window_nll",
    "IM_END_ID",
    "chat_prompt",
    "encode_chat",
]
