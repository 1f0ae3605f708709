"""Next-use predictors in Flax NNX: an MLP (or linear) baseline, an LSTM over a block's
access-gap history and a small Transformer over the same.

Each maps features (``kvjax.learned.features``, float32 [..., F]) to logits over the
next-use distance classes of ``kvjax.learned.labels`` (float32 [..., B]). A model is
used two ways: as an ``nnx.Module`` for training (``kvjax.learned.train``), and as a
pure function of a parameter pytree (``Predictor``: a static graph definition plus
arrays), which is what the ``learned`` policy carries in its state so new parameters do
not recompile the step. Names in shapes: F = features, K = gaps, B = classes.

>>> m = make_model("mlp", seed=0)
>>> m(jnp.zeros((2, NUM_FEATURES))).shape
(2, 9)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from kvjax.learned.features import GAPS
from kvjax.learned.features import gap_sequence
from kvjax.learned.features import NUM_FEATURES
from kvjax.learned.features import STATIC
from kvjax.learned.labels import NUM_CLASSES

KINDS = ("linear", "mlp", "lstm", "transformer")
TOKEN = STATIC + 2  # features per gap token of the sequence models


class MLP(nnx.Module):
  """Features -> logits; ``hidden=()`` is a linear (multinomial logistic) model."""

  def __init__(self, hidden: tuple = (64, 64), *, rngs: nnx.Rngs):
    dims = (NUM_FEATURES,) + tuple(hidden)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.out = nnx.Linear(dims[-1], NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return self.out(x)


class LSTM(nnx.Module):
  """An LSTM over the gap history (oldest gap first), logits from its last state."""

  def __init__(self, hidden: int = 32, *, rngs: nnx.Rngs):
    self.cell = nnx.OptimizedLSTMCell(TOKEN, hidden, rngs=rngs)
    self.hidden = hidden
    self.out = nnx.Linear(hidden + STATIC, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    seq = gap_sequence(x)                       # [..., K, TOKEN]
    batch = seq.shape[:-2]
    carry = self.cell.initialize_carry(batch + (TOKEN,), nnx.Rngs(0))
    for k in range(GAPS):
      carry, h = self.cell(carry, seq[..., k, :])
    return self.out(jnp.concatenate([h, x[..., :STATIC]], axis=-1))


class Transformer(nnx.Module):
  """A small pre-norm Transformer encoder over the gap tokens plus a summary token."""

  def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(TOKEN, dim, rngs=rngs)
    self.summary = nnx.Param(jnp.zeros((1, dim)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (GAPS + 1, dim)))
    self.norm1 = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(depth)])
    self.attn = nnx.List([nnx.MultiHeadAttention(num_heads=heads, in_features=dim,
                                                 decode=False, rngs=rngs)
                          for _ in range(depth)])
    self.norm2 = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(depth)])
    self.ff = nnx.List([nnx.Linear(dim, dim, rngs=rngs) for _ in range(depth)])
    self.out = nnx.Linear(dim + STATIC, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    tok = self.embed(gap_sequence(x))           # [..., K, D]
    summ = jnp.broadcast_to(self.summary[...], tok.shape[:-2] + self.summary.shape)
    h = jnp.concatenate([summ, tok], axis=-2) + self.pos[...]
    for n1, at, n2, ff in zip(self.norm1, self.attn, self.norm2, self.ff):
      y = n1(h)
      h = h + at(y, y, y)
      h = h + ff(jax.nn.gelu(n2(h)))
    return self.out(jnp.concatenate([h[..., 0, :], x[..., :STATIC]], axis=-1))


def make_model(kind: str = "mlp", seed: int = 0) -> nnx.Module:
  """A freshly initialized model of ``kind`` (one of ``KINDS``), from an int seed."""
  rngs = nnx.Rngs(seed)
  if kind == "linear":
    return MLP(hidden=(), rngs=rngs)
  if kind == "mlp":
    return MLP(rngs=rngs)
  if kind == "lstm":
    return LSTM(rngs=rngs)
  if kind == "transformer":
    return Transformer(rngs=rngs)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
  """A model as a pure function: ``predict(params, features) -> logits``.

  ``graph`` is static (hashable by identity); ``params`` (an ``nnx.State`` of arrays)
  travel separately, e.g. in the ``learned`` policy's state.

  >>> p, params = predictor(make_model("linear"))
  >>> p.predict(params, jnp.zeros(NUM_FEATURES)).shape
  (9,)
  """

  kind: str
  graph: Any

  def predict(self, params, features: jax.Array) -> jax.Array:
    """float32 [..., B] logits of float32 [..., F] ``features``."""
    if features.shape[-1] != NUM_FEATURES:
      raise ValueError(f"features must end in {NUM_FEATURES} values, got shape "
                       f"{features.shape}")
    return nnx.merge(self.graph, params)(features)


def predictor(model: nnx.Module) -> tuple[Predictor, Any]:
  """(the ``Predictor`` of ``model``, its parameter state)."""
  kind = {MLP: "mlp", LSTM: "lstm", Transformer: "transformer"}[type(model)]
  if kind == "mlp" and not model.layers:
    kind = "linear"
  graph, params = nnx.split(model)
  return Predictor(kind, graph), params


