"""A Llama-style decoder (RoPE, GQA, RMSNorm, SwiGLU) as pure functions over a params pytree.

Parameters are ``flax.struct`` dataclasses of arrays; the per-layer weights are
stacked on a leading layer axis so the layers run under ``jax.lax.scan``. Two
entry points share one layer function:

- ``forward``: a full causal pass without a cache (the reference).
- ``decode_step``: one jitted step (a prefill chunk or a single decode token per
  sequence) that plans pages once, then writes K/V into and attends over the
  paged cache layer by layer, donating the cache.

RoPE uses the "rotate half" convention (``x[i]`` pairs with ``x[i + D/2]``), as in
Hugging Face's Llama; the GGUF loader undoes llama.cpp's Q/K row permutation to
match. Names used in shapes: B batch, T tokens per row, V vocab, E d_model,
N query heads, K kv heads, D head_dim, F ffn size, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import drop
from kvjax.cache.attend import grouped_attention
from kvjax.cache.attend import write_attend
from kvjax.cache.config import CacheConfig
from kvjax.cache.plan import context_plan
from kvjax.cache.plan import flag_sequences
from kvjax.cache.plan import layer_plan
from kvjax.cache.plan import plan_step
from kvjax.cache.plan import write_flags
from kvjax.cache.state import CacheState
from kvjax.cache.status import BAD_INPUT
from kvjax.cache.status import enforce_checked
from kvjax.layout.pages import flat_layer
from kvjax.layout.pages import with_flat_layer
from kvjax.rope import rope


# Backends whose matrix units run bfloat16 natively; XLA:CPU upcasts, so there bfloat16
# weights cost more than float32 (benchmarks/decode.py ``weights_dtype``: 2-4x per step).
BF16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def compute_dtype(dtype="auto", backend: str | None = None) -> jnp.dtype:
  """The weights' dtype for ``dtype``: ``"auto"`` is bfloat16 on GPU and TPU, float32 on CPU.

  Any other value is returned as a ``jnp.dtype`` (``"float32"``, ``"bfloat16"``...).

  >>> compute_dtype("auto", backend="cpu").name, compute_dtype("auto", backend="tpu").name
  ('float32', 'bfloat16')
  >>> compute_dtype("bfloat16").name
  'bfloat16'
  """
  if isinstance(dtype, str) and dtype == "auto":
    backend = jax.default_backend() if backend is None else backend
    return jnp.dtype(jnp.bfloat16 if backend in BF16_BACKENDS else jnp.float32)
  try:
    out = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype must be 'auto' or a float dtype name, got {dtype!r}") from None
  if not jnp.issubdtype(out, jnp.floating):
    raise ValueError(f"dtype must be a float dtype, got {out.name}")
  return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-style decoder; frozen and hashable (a static jit argument).

  Args:
    vocab_size: V, tokens in the vocabulary.
    d_model: E, width of the residual stream.
    num_layers: L, decoder layers.
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (N must be a multiple of K: grouped-query attention).
    head_dim: D, size of one head (even, for RoPE).
    ffn_dim: F, hidden size of the SwiGLU MLP.
    rope_base: RoPE frequency base (theta).
    rms_eps: epsilon inside RMSNorm.

  The output projection is tied to the token embeddings.

  >>> LlamaConfig.small().num_kv_heads
  2
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_base: float = 10000.0
  rms_eps: float = 1e-5

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "ffn_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if not self.rope_base > 1.0:
      raise ValueError(f"LlamaConfig.rope_base must be > 1, got {self.rope_base!r}")
    if not self.rms_eps > 0.0:
      raise ValueError(f"LlamaConfig.rms_eps must be > 0, got {self.rms_eps!r}")

  @classmethod
  def small(cls) -> "LlamaConfig":
    """A tiny config of the same architecture for fast random-weight tests."""
    return cls(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, ffn_dim=128, rope_base=10000.0, rms_eps=1e-5)

  def cache_config(self, *, page_size: int, num_pages: int, max_seqs: int,
                   max_pages_per_seq: int, prerope_keys: bool = False, dtype: str = "auto",
                   model_dtype=None, **kwargs) -> CacheConfig:
    """A ``kvjax.CacheConfig`` whose layer/head shapes match this model.

    ``prerope_keys=True`` stores keys before RoPE (``key_rope=self.rope_base``).
    ``dtype`` is the storage dtype of unquantized pages; ``"auto"`` (as vLLM's
    ``kv_cache_dtype="auto"``) takes the model's dtype ``model_dtype`` (a name or a
    dtype: ``"bfloat16"`` for a bf16 checkpoint such as SmolLM2), or ``"float32"``,
    the dtype ``read_params`` loads weights in, when ``model_dtype`` is None.

    >>> LlamaConfig.small().cache_config(page_size=4, num_pages=8, max_seqs=2,
    ...                                  max_pages_per_seq=4).num_kv_heads
    2
    >>> LlamaConfig.small().cache_config(page_size=4, num_pages=8, max_seqs=2,
    ...                                  max_pages_per_seq=4, model_dtype="bfloat16").dtype
    'bfloat16'
    """
    if prerope_keys:
      kwargs["key_rope"] = self.rope_base
    if dtype == "auto":
      dtype = "float32" if model_dtype is None else jnp.dtype(model_dtype).name
    return CacheConfig(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                             head_dim=self.head_dim, page_size=page_size, num_pages=num_pages,
                             max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq,
                             dtype=dtype, **kwargs)


@struct.dataclass
class LayerParams:
  """Weights of all decoder layers, stacked on a leading layer axis.

  The projections that read the same input are stored side by side, as vLLM's
  ``QKVParallelLinear`` and ``MergedColumnParallelLinear`` do: one ``[E, (N+2K)*D]``
  matmul for q, k and v and one ``[E, 2F]`` for the SwiGLU gate and up, where
  separate weights took five. On the 2-core CPU a decode step's small matmuls then run at
  a better rate: the SmolLM2-135M paged decode step (30 layers, float32) took 0.968 of its
  time with separate weights at batch 1 context 128, 0.945 at b1 c512, 0.952 at b8 c512
  and 0.953 at b4 c2048 (median of 9 interleaved pairs, one process). ``wq``, ``wk``,
  ``wv``, ``w_gate`` and ``w_up`` are views of the stacked blocks; ``from_separate``
  builds one from separate weights.

  >>> lp = LayerParams.from_separate(
  ...     attn_norm=jnp.ones((1, 4)), wq=jnp.ones((1, 4, 4)), wk=jnp.zeros((1, 4, 2)),
  ...     wv=2 * jnp.ones((1, 4, 2)), wo=jnp.ones((1, 4, 4)), mlp_norm=jnp.ones((1, 4)),
  ...     w_gate=jnp.ones((1, 4, 6)), w_up=3 * jnp.ones((1, 4, 6)), w_down=jnp.ones((1, 6, 4)))
  >>> lp.wqkv.shape, lp.wv.shape, float(lp.wv[0, 0, 0]), lp.w_gate_up.shape, float(lp.w_up[0, 0, 0])
  ((1, 4, 8), (1, 4, 2), 2.0, (1, 4, 12), 3.0)
  """

  attn_norm: jax.Array  # [L, E]            RMSNorm scale before attention
  wqkv: jax.Array       # [L, E, (N+2K)*D]  q | k | v projections (q, k in rotate-half head layout)
  wo: jax.Array         # [L, N*D, E]       attention output projection
  mlp_norm: jax.Array   # [L, E]            RMSNorm scale before the MLP
  w_gate_up: jax.Array  # [L, E, 2F]        SwiGLU gate | up
  w_down: jax.Array     # [L, F, E]         SwiGLU down

  @classmethod
  def from_separate(cls, *, attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up,
                    w_down) -> "LayerParams":
    """The stacked layout from separate ``wq [L, E, N*D]``, ``wk``/``wv [L, E, K*D]``,
    ``w_gate``/``w_up [L, E, F]`` (the other weights as in the fields)."""
    if wk.shape != wv.shape or w_gate.shape != w_up.shape:
      raise ValueError(f"wk {tuple(wk.shape)} and wv {tuple(wv.shape)}, w_gate "
                       f"{tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must pair up")
    cat = jnp.concatenate if isinstance(wq, jax.Array) else np.concatenate
    return cls(attn_norm=attn_norm, wqkv=cat([wq, wk, wv], axis=-1), wo=wo,
               mlp_norm=mlp_norm, w_gate_up=cat([w_gate, w_up], axis=-1), w_down=w_down)

  @property
  def _q_width(self) -> int:
    return self.wo.shape[-2]                       # N*D

  @property
  def _kv_width(self) -> int:
    return (self.wqkv.shape[-1] - self._q_width) // 2

  @property
  def wq(self) -> jax.Array:
    """``[L, E, N*D]`` query projection."""
    return self.wqkv[..., :self._q_width]

  @property
  def wk(self) -> jax.Array:
    """``[L, E, K*D]`` key projection."""
    return self.wqkv[..., self._q_width:self._q_width + self._kv_width]

  @property
  def wv(self) -> jax.Array:
    """``[L, E, K*D]`` value projection."""
    return self.wqkv[..., self._q_width + self._kv_width:]

  @property
  def w_gate(self) -> jax.Array:
    """``[L, E, F]`` SwiGLU gate."""
    return self.w_gate_up[..., :self.w_down.shape[-2]]

  @property
  def w_up(self) -> jax.Array:
    """``[L, E, F]`` SwiGLU up."""
    return self.w_gate_up[..., self.w_down.shape[-2]:]


@struct.dataclass
class LlamaParams:
  """All weights of the decoder; the output head is tied to ``embed``."""

  embed: jax.Array       # [V, E]  token embeddings (also the output projection)
  layers: LayerParams    # stacked per-layer weights
  final_norm: jax.Array  # [E]     RMSNorm scale before the output head


def param_shapes(config: LlamaConfig) -> LlamaParams:
  """The shape of every parameter (a ``LlamaParams`` of tuples)."""
  c = config
  L, E, F = c.num_layers, c.d_model, c.ffn_dim
  return LlamaParams(
      embed=(c.vocab_size, E),
      layers=LayerParams(
          attn_norm=(L, E), wqkv=(L, E, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
          wo=(L, c.num_heads * c.head_dim, E), mlp_norm=(L, E),
          w_gate_up=(L, E, 2 * F), w_down=(L, F, E)),
      final_norm=(E,),
  )


def separate_shapes(config: LlamaConfig) -> dict:
  """``{name: shape}`` of each layer weight before the q|k|v and gate|up stacking, in
  ``LayerParams.from_separate``'s names (how checkpoints store them).

  >>> separate_shapes(LlamaConfig.small())["wk"]
  (2, 64, 32)
  """
  c = config
  L, E, F = c.num_layers, c.d_model, c.ffn_dim
  return {"attn_norm": (L, E), "wq": (L, E, c.num_heads * c.head_dim),
          "wk": (L, E, c.num_kv_heads * c.head_dim), "wv": (L, E, c.num_kv_heads * c.head_dim),
          "wo": (L, c.num_heads * c.head_dim, E), "mlp_norm": (L, E), "w_gate": (L, E, F),
          "w_up": (L, E, F), "w_down": (L, F, E)}


def check_params(params: LlamaParams, config: LlamaConfig) -> None:
  """Raise ``ValueError`` naming the first parameter whose shape does not fit ``config``."""
  want = param_shapes(config)
  got_leaves = jax.tree_util.tree_leaves_with_path(params)
  want_leaves = jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, tuple))
  if len(got_leaves) != len(want_leaves):
    raise ValueError(f"params: expected {len(want_leaves)} arrays, got {len(got_leaves)}")
  for (path, arr), shape in zip(got_leaves, want_leaves):
    if tuple(arr.shape) != tuple(shape):
      name = jax.tree_util.keystr(path)
      raise ValueError(f"params{name}: expected shape {tuple(shape)} for {config}, "
                       f"got {tuple(arr.shape)}")


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> LlamaParams:
  """Random weights (scaled normal; norms near 1) for tests and benchmarks.

  >>> p = init_params(LlamaConfig.small(), jax.random.key(0))
  >>> p.layers.wq.shape
  (2, 64, 64)
  """
  shapes = param_shapes(config)
  k_embed, k_layers, k_norm = jax.random.split(key, 3)

  def normal(k, shape, std):
    return (std * jax.random.normal(k, shape)).astype(dtype)

  def near_one(k, shape):
    # RMSNorm scales: near one, varied so that a misplaced norm shows in tests.
    return (1.0 + 0.1 * jax.random.normal(k, shape)).astype(dtype)

  # one key per separate weight, drawn as before the q|k|v and gate|up stacking
  separate = separate_shapes(config)
  layer_keys = dict(zip(separate, jax.random.split(k_layers, len(separate))))
  layers = {}
  for name, shape in separate.items():
    if name.endswith("norm"):
      layers[name] = near_one(layer_keys[name], shape)
    else:
      layers[name] = normal(layer_keys[name], shape, 1.0 / math.sqrt(shape[-2]))
  return LlamaParams(
      embed=normal(k_embed, shapes.embed, 1.0 / math.sqrt(config.d_model)),
      layers=LayerParams.from_separate(**layers),
      final_norm=near_one(k_norm, shapes.final_norm),
  )


# ----------------------------------------------------------------------------- pieces


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in float32. x: [..., E], scale: [E]."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = 256) -> jax.Array:
  """Dense causal grouped-query attention (the no-cache reference).

  Queries go in blocks of ``block`` tokens, each against the keys up to its own
  end, which skips most of the masked upper triangle on long inputs.

  Args:
    q: [B, T, N, D]; k, v: [B, T, K, D] with N a multiple of K.
    block: query tokens per block (static).

  Returns:
    [B, T, N, D], softmax scale 1/sqrt(D), token t attends to tokens <= t.
    No padding: every key is a real token of its row, so a non-finite value
    reaches only its own row (inside a block also the row's earlier queries,
    see ``grouped_attention``).

  >>> x = jnp.ones((1, 3, 2, 4))
  >>> causal_attention(x, x[:, :, :1], x[:, :, :1]).shape
  (1, 3, 2, 4)
  """
  t = q.shape[1]
  outs = [_attention_block(q[:, s:s + block], k[:, :s + block], v[:, :s + block], s)
          for s in range(0, t, block)]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _attention_block(q: jax.Array, k: jax.Array, v: jax.Array, q_start: int) -> jax.Array:
  """Queries [B, Tq, N, D] at positions q_start.. against keys/values [B, Tk, K, D] at 0..Tk-1."""
  b, tq = q.shape[:2]
  tk = k.shape[1]
  visible = (q_start + jnp.arange(tq))[:, None] >= jnp.arange(tk)[None, :]     # [Tq, Tk]
  return grouped_attention(q, k, v, jnp.broadcast_to(visible, (b, tq, tk)))


def decoder_layer(lp: LayerParams, x: jax.Array, positions: jax.Array, attention,
                  config: LlamaConfig, *, rope_keys: bool = True):
  """One decoder layer on hidden states ``x [B, T, E]`` at ``positions [B, T]``.

  ``attention(q, k, v) -> (out [B, T, Hq, D], aux)`` is dense or paged (its
  ``aux`` is returned); with ``rope_keys=False`` it gets the keys before RoPE (a
  cache with ``key_rope``). Returns ``(x [B, T, E], aux)``.

  >>> import jax
  >>> cfg = LlamaConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                   head_dim=4, ffn_dim=16)
  >>> lp = jax.tree.map(lambda a: a[0], init_params(cfg, jax.random.key(0)).layers)
  >>> dense = lambda q, k, v: (q, None)      # a stand-in attention, same shape as q
  >>> decoder_layer(lp, jnp.ones((1, 3, 8)), jnp.arange(3)[None], dense, cfg)[0].shape
  (1, 3, 8)
  """
  b, t, _ = x.shape
  c = config
  h = rms_norm(x, lp.attn_norm, c.rms_eps)
  nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  qkv = h @ lp.wqkv                                   # one matmul: [B, T, (N+2K)*D]
  q = qkv[..., :nq].reshape(b, t, c.num_heads, c.head_dim)
  k = qkv[..., nq:nq + nk].reshape(b, t, c.num_kv_heads, c.head_dim)
  v = qkv[..., nq + nk:].reshape(b, t, c.num_kv_heads, c.head_dim)
  q = rope(q, positions, c.rope_base)
  if rope_keys:
    k = rope(k, positions, c.rope_base)
  attn, aux = attention(q, k, v)
  x = x + attn.reshape(b, t, c.num_heads * c.head_dim) @ lp.wo
  h = rms_norm(x, lp.mlp_norm, c.rms_eps)
  gate_up = h @ lp.w_gate_up                          # one matmul: [B, T, 2F]
  x = x + (jax.nn.silu(gate_up[..., :c.ffn_dim]) * gate_up[..., c.ffn_dim:]) @ lp.w_down
  return x, aux


def lm_logits(params: LlamaParams, x: jax.Array, config: LlamaConfig) -> jax.Array:
  """float32 ``[..., vocab]`` logits of final hidden states ``x [..., E]`` (final norm, tied
  embedding)."""
  x = rms_norm(x, params.final_norm, config.rms_eps)
  return (x.astype(jnp.float32) @ params.embed.astype(jnp.float32).T)


def _check_tokens(tokens, name="tokens") -> None:
  if tokens.ndim != 2:
    raise ValueError(f"{name} must be int32 [B, T], got shape {tuple(tokens.shape)}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {tokens.dtype}")


# ----------------------------------------------------------------------------- forward


def hidden_states(params: LlamaParams, tokens: jax.Array, config: LlamaConfig) -> jax.Array:
  """Final hidden states (before the last norm) of a full causal pass: [B, T, E]."""
  _check_tokens(tokens)
  check_params(params, config)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  dense = lambda q, k, v: (causal_attention(q, k, v), None)  # noqa: E731

  def body(x, lp):
    x, _ = decoder_layer(lp, x, positions, dense, config)
    return x, None

  x = params.embed[tokens]
  x, _ = jax.lax.scan(body, x, params.layers)
  return x


@functools.partial(jax.jit, static_argnames=("config",))
def forward(params: LlamaParams, tokens: jax.Array, config: LlamaConfig) -> jax.Array:
  """Full causal forward pass with no cache: the reference for ``decode_step``.

  Args:
    params: ``LlamaParams`` for ``config``.
    tokens: int32 [B, T], positions 0..T-1 in every row.
    config: static ``LlamaConfig``.

  Returns:
    float32 [B, T, V] logits.

  >>> cfg = LlamaConfig.small()
  >>> forward(init_params(cfg, jax.random.key(0)), jnp.zeros((1, 3), jnp.int32), cfg).shape
  (1, 3, 256)
  """
  return lm_logits(params, hidden_states(params, tokens, config), config)


@functools.partial(jax.jit, static_argnames=("config",))
def token_nll(params: LlamaParams, tokens: jax.Array, config: LlamaConfig) -> jax.Array:
  """Next-token negative log-likelihoods of a full causal pass.

  Args:
    tokens: int32 [B, T].

  Returns:
    float32 [B, T-1]: ``-log p(tokens[:, t+1] | tokens[:, :t+1])``. Only these
    (not the [B, T, V] logits) leave the device.

  >>> cfg = LlamaConfig.small()
  >>> token_nll(init_params(cfg, jax.random.key(0)), jnp.zeros((1, 4), jnp.int32), cfg).shape
  (1, 3)
  """
  x = hidden_states(params, tokens, config)[:, :-1]
  x = rms_norm(x, params.final_norm, config.rms_eps).astype(jnp.float32)
  embed = params.embed.astype(jnp.float32)
  logz = jax.nn.logsumexp(x @ embed.T, axis=-1)
  # The target's logit as a row dot product: no gather from the [B, T, V] logits.
  target = jnp.sum(x * embed[tokens[:, 1:]], axis=-1)
  return logz - target


# ----------------------------------------------------------------------------- paged


def _check_step_args(tokens, seq_ids, num_new, config: LlamaConfig,
                     cache_config: CacheConfig) -> None:
  _check_tokens(tokens)
  b = tokens.shape[0]
  if tuple(seq_ids.shape) != (b,):
    raise ValueError(f"seq_ids must be int32 [B]=[{b}], got shape {tuple(seq_ids.shape)}")
  if tuple(num_new.shape) != (b,):
    raise ValueError(f"num_new must be int32 [B]=[{b}], got shape {tuple(num_new.shape)}")
  for name, got, want in (("num_layers", cache_config.num_layers, config.num_layers),
                          ("num_kv_heads", cache_config.num_kv_heads, config.num_kv_heads),
                          ("head_dim", cache_config.head_dim, config.head_dim)):
    if got != want:
      raise ValueError(f"cache_config.{name}={got} does not match the model's {name}={want}")
  if cache_config.key_rope and cache_config.key_rope != config.rope_base:
    raise ValueError(f"cache_config.key_rope={cache_config.key_rope} (keys stored before RoPE) "
                     f"must be the model's rope_base={config.rope_base}")


def decode_step(params: LlamaParams, cache: CacheState, tokens: jax.Array,
                seq_ids: jax.Array, num_new: jax.Array, seeds: jax.Array | None = None, *,
                config: LlamaConfig, cache_config: CacheConfig,
                context_pages: int | None = None):
  """One step through the paged cache: a prefill chunk (T > 1) or a decode token (T = 1).

  Plans pages once for the batch, then scans the layers with the K/V pools in
  the scan's carry: each layer's RoPE'd K and V of the new tokens are written
  into their slots of the whole pool (``kvjax.layout.flat_layer`` with
  ``kvjax.cache.plan.layer_plan``), so a step writes O(new tokens), not a copy
  of every layer, and the queries attend over the sequence's pages.
  The cache is donated. A cache in drop mode (``kvjax.drop.enable``) takes
  the same layer scan, which then also rotates by each sequence's logical
  positions (``seq_lens + dropped``) and accumulates every page's attention
  mass (``write_attend(..., with_mass=True)``, then ``kvjax.drop.accumulate``);
  call ``kvjax.drop.drop_pages`` between steps. Quantized pages (``cache_config.key_quant`` /
  ``value_quant``) are quantized on write and dequantized in attention
  (``write_attend``); the compiled step depends on the specs
  only through the static config.

  A row whose new K or V holds a NaN or inf is flagged ``NON_FINITE`` in its
  sequence's ``cache.seq_status`` (and ``cache.status``). With
  ``cache_config.checked``, a step that left a flag set raises
  ``kvjax.CacheStatusError`` after it returned: ``err.state`` is the new cache
  (usable; the donated input is gone, nothing else is lost).

  Args:
    params: ``LlamaParams`` for ``config``.
    cache: ``kvjax.CacheState`` for ``cache_config`` (donated).
    tokens: int32 [B, T]; row b's first ``num_new[b]`` tokens are real, the rest padding.
    seq_ids: int32 [B], the cache's sequence slot of each row (-1 = padding row).
    num_new: int32 [B] in [0, T].
    seeds: optional uint32 [B, 2] namespace seeds (``kvjax.tenant_seed``) for
      ``kvjax.plan_step``: a sequence that starts takes its row's.
    config, cache_config: static; layers, kv heads and head_dim must agree.
    context_pages: static; attention reads only the first ``context_pages``
      columns of each row's page table (``kvjax.cache.plan.context_plan``), so
      its cost follows the batch's longest row rather than
      ``max_pages_per_seq``; one compile per value. None: the full width.
      A row longer than ``context_pages * page_size`` after the step is
      flagged ``BAD_INPUT`` (its logits are meaningless; its K/V are
      written). Ignored in drop mode (its page mass spans the full table).

  Returns:
    (logits float32 [B, T, V], cache). Logits of padding tokens, padding rows and
    refused rows (``cache.seq_status`` tells) are meaningless.

  >>> import kvjax

  >>> cfg = LlamaConfig.small()
  >>> cc = cfg.cache_config(page_size=4, num_pages=8, max_seqs=2, max_pages_per_seq=4)
  >>> logits, cache = decode_step(init_params(cfg, jax.random.key(0)), kvjax.init(cc),
  ...     jnp.zeros((2, 3), jnp.int32), jnp.array([0, 1]), jnp.array([3, 2]),
  ...     config=cfg, cache_config=cc)
  >>> logits.shape
  (2, 3, 256)
  """
  if context_pages is not None and context_pages == cache_config.max_pages_per_seq:
    context_pages = None    # the full width: the same program as without it
  logits, cache = _decode_step(params, cache, tokens, seq_ids, num_new, seeds, config=config,
                               cache_config=cache_config, context_pages=context_pages)
  return logits, enforce_checked(cache, cache_config)


@functools.partial(jax.jit, static_argnames=("config", "cache_config", "context_pages"),
                   donate_argnames=("cache",))
def _decode_step(params, cache, tokens, seq_ids, num_new, seeds, *, config, cache_config,
                 context_pages=None):
  """``decode_step``'s jitted body (flags recorded, nothing raised)."""
  _check_step_args(tokens, seq_ids, num_new, config, cache_config)
  check_params(params, config)
  tokens = tokens.astype(jnp.int32)
  seq_ids = seq_ids.astype(jnp.int32)
  dropping = cache.drop is not None   # static: page-dropping mode (kvjax.drop), opt-in
  positions_offset = None
  if dropping:   # logical RoPE positions; empty slots start afresh
    cache, positions_offset = drop.begin_step(cache, seq_ids)
  plan, cache = plan_step(cache, seq_ids, tokens, num_new.astype(jnp.int32), seeds,
                          config=cache_config)
  rope_positions = plan.positions                                   # [B, T]
  over = None
  if context_pages is not None and not dropping:   # attention over the rows' own pages
    plan, over = context_plan(plan, context_pages, cache_config.page_size)
  if dropping:
    rope_positions = plan.positions + positions_offset[:, None]     # logical positions

  def body(carry, xs):   # the pools ride in the carry: each layer writes only its new slots
    x, mass, k_all, v_all = carry
    lp, i = xs
    k_view, v_view = flat_layer(k_all, i), flat_layer(v_all, i)
    lplan = layer_plan(plan, i, k_all)

    def paged(q, k, v):
      res = write_attend(q, k, v, k_view, v_view, lplan, with_mass=dropping)
      return res.out, (res.k_pages, res.v_pages, res.mass,
                       write_flags(lplan, k, v, k_view, v_view))

    x, (k_view, v_view, m, flags) = decoder_layer(lp, x, rope_positions, paged, config,
                                                  rope_keys=not cache_config.key_rope)
    if dropping:   # the page mass, summed over layers
      mass = mass + m
    carry = (x, mass, with_flat_layer(k_all, i, k_view), with_flat_layer(v_all, i, v_view))
    return carry, flags

  x = params.embed[tokens]
  mass0 = jnp.zeros(plan.page_table.shape, jnp.float32) if dropping else None   # [B, M]
  (x, mass, k_all, v_all), flags = jax.lax.scan(
      body, (x, mass0, cache.k, cache.v), (params.layers, jnp.arange(cache.k.data.shape[0])))
  cache = cache.replace(k=k_all, v=v_all)
  if dropping:
    cache = drop.accumulate(cache, plan, mass)
  flags = jnp.bitwise_or.reduce(flags, axis=0)
  if over is not None:
    flags = flags | jnp.where(over, BAD_INPUT, 0).astype(flags.dtype)
  cache = flag_sequences(cache, plan.seq_ids, flags)
  return lm_logits(params, x, config), cache
