"""Training the next-use predictors: Optax, reproducible from a seed; Orbax checkpoints;
online fine-tuning on a stream.

* ``fit``: minibatch AdamW on the censored cross-entropy of ``loss`` (a censored label
  counts the probability of every class from its lower bound up). The same seed, data
  and settings give the same parameters bit for bit (initialization and the minibatch
  order both come from the seed).
* ``save`` / ``restore``: a predictor's parameters as an Orbax checkpoint (a folder),
  with its kind beside it, so ``restore`` rebuilds the ``Predictor`` too.
* ``finetune_stream``: online fine-tuning on a stream of references in chunks: before
  chunk ``j`` the parameters are updated on the references seen so far with the labels
  known by then (next uses inside the past only, censored at the present), so nothing
  of the future is used; it returns the parameters in force during each chunk.

Names in shapes: N = examples, F = features, B = classes.

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(64, NUM_FEATURES)).astype(np.float32)
>>> k = (x[:, 0] > 0).astype(np.int32) * 8
>>> pred, params, hist = fit(x, k, np.zeros(64, bool), kind="linear", steps=50, seed=0)
>>> hist[-1] < hist[0]
True
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from kvjax.learned.features import extract
from kvjax.learned.features import NUM_FEATURES
from kvjax.learned.labels import distance_classes
from kvjax.learned.labels import NUM_CLASSES
from kvjax.learned.models import make_model
from kvjax.learned.models import Predictor
from kvjax.learned.models import predictor


def loss(logits: jax.Array, klass: jax.Array, censored: jax.Array,
         weight: Optional[jax.Array] = None) -> jax.Array:
  """float32 []: mean censored cross-entropy.

  Args:
    logits: float32 [N, B].
    klass: int32 [N] the class (a lower bound where ``censored``).
    censored: bool [N].
    weight: float32 [N] per-example weights (ones when None).

  >>> abs(float(loss(jnp.zeros((1, NUM_CLASSES)), jnp.array([0]), jnp.array([True]))))
  0.0
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  exact = jnp.take_along_axis(logp, klass[:, None], axis=-1)[:, 0]
  above = jnp.arange(NUM_CLASSES)[None, :] >= klass[:, None]
  tail = jax.nn.logsumexp(jnp.where(above, logp, -jnp.inf), axis=-1)
  nll = -jnp.where(censored, tail, exact)
  w = jnp.ones_like(nll) if weight is None else weight
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1e-9)


@functools.lru_cache(maxsize=32)
def _make_step(pred: Predictor, opt: optax.GradientTransformation):
  """The jitted AdamW step (cached per predictor and optimizer: one compilation for the
  chunks of ``finetune_stream``)."""
  @jax.jit
  def step(params, opt_state, x, k, c, w):
    val, grads = jax.value_and_grad(lambda p: loss(pred.predict(p, x), k, c, w))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, val
  return step


@functools.lru_cache(maxsize=32)
def _adamw(lr: float, steps: int, weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.05),
                     weight_decay=weight_decay)


def fit(features: np.ndarray, klass: np.ndarray, censored: np.ndarray, *, kind: str = "mlp",
        steps: int = 2000, batch: int = 1024, lr: float = 3e-3, weight_decay: float = 1e-4,
        seed: int = 0, params: Any = None, pred: Optional[Predictor] = None
        ) -> tuple[Predictor, Any, list]:
  """Train a predictor; returns ``(predictor, params, loss per step)``.

  Args:
    features: float32 [N, F]; klass: int32 [N]; censored: bool [N] (``labels``).
    kind: a ``models.KINDS`` name (ignored when ``pred`` and ``params`` are given, which
      continues training them).
    steps, batch, lr, weight_decay: AdamW with a cosine schedule over ``steps``.
    seed: initialization and minibatch order.
  """
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[1] != NUM_FEATURES:
    raise ValueError(f"features must be [N, {NUM_FEATURES}], got shape {features.shape}")
  n = features.shape[0]
  if n == 0 or klass.shape != (n,) or censored.shape != (n,):
    raise ValueError(f"klass and censored must be [N={n}] (N > 0), got {klass.shape} and "
                     f"{censored.shape}")
  if pred is None or params is None:
    pred, params = predictor(make_model(kind, seed))
  opt = _adamw(lr, max(steps, 1), weight_decay)
  opt_state = opt.init(params)
  step = _make_step(pred, opt)
  rng = np.random.default_rng(seed)
  b = min(batch, n)
  history = []
  x_all, k_all, c_all = (jnp.asarray(features), jnp.asarray(klass, jnp.int32),
                         jnp.asarray(censored, bool))
  w = jnp.ones((b,), jnp.float32)
  for _ in range(steps):
    idx = jnp.asarray(rng.integers(0, n, b))
    params, opt_state, val = step(params, opt_state, x_all[idx], k_all[idx], c_all[idx], w)
    history.append(float(val))
  return pred, params, history


def training_set(block, position, filled, page_size: int, start: int, stop: int,
                 features: Optional[np.ndarray] = None) -> tuple:
  """(features [M, F], klass [M], censored [M]) of references ``[start, stop)``, labels
  from inside that window only (``labels.distance_classes``).

  ``features`` (of the whole stream, ``extract``) is sliced when given; features only
  look back, so slicing them leaks nothing of the future.
  """
  if features is None:
    features = extract(block[:stop], position[:stop], filled[:stop], page_size)
  klass, cens = distance_classes(np.asarray(block), start, stop)
  return np.asarray(features[start:stop]), klass, cens


def save(path: str, pred: Predictor, params) -> None:
  """Write ``params`` as an Orbax checkpoint in folder ``path`` (replaced) and the
  predictor's kind in ``path/kind.json``."""
  path = os.path.abspath(path)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, "params"), nnx.to_pure_dict(params), force=True)
  ckpt.wait_until_finished()
  with open(os.path.join(path, "kind.json"), "w") as f:
    json.dump({"kind": pred.kind, "features": NUM_FEATURES, "classes": NUM_CLASSES}, f)


def restore(path: str) -> tuple[Predictor, Any]:
  """``(predictor, params)`` saved by ``save`` in folder ``path``.

  Raises:
    ValueError: the folder holds no checkpoint, or one of another feature/class layout.
  """
  path = os.path.abspath(path)
  meta_path = os.path.join(path, "kind.json")
  if not os.path.exists(meta_path):
    raise ValueError(f"no predictor checkpoint in {path!r} (kind.json missing)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("features") != NUM_FEATURES or meta.get("classes") != NUM_CLASSES:
    raise ValueError(f"checkpoint {path!r} has {meta.get('features')} features and "
                     f"{meta.get('classes')} classes; this kvjax uses {NUM_FEATURES} and "
                     f"{NUM_CLASSES}")
  pred, params = predictor(make_model(meta["kind"], 0))
  target = nnx.to_pure_dict(params)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  loaded = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
  nnx.replace_by_pure_dict(params, loaded)
  return pred, params


def finetune_stream(pred: Predictor, params, block: np.ndarray, features: np.ndarray, *,
                    chunk: int = 8192, steps: int = 50, batch: int = 512,
                    lr: float = 1e-3, window: int = 4, seed: int = 0) -> list:
  """Online fine-tuning: the parameters in force during each chunk of a stream.

  Before chunk ``j`` (references ``[j * chunk, (j + 1) * chunk)``) the parameters take
  ``steps`` AdamW steps on the last ``window`` chunks, labelled with next uses seen
  before chunk ``j`` only (censored there). Chunk 0 uses ``params`` as given.

  Args:
    pred, params: the predictor and its starting parameters.
    block: int [N] block ids of the stream; features: float32 [N, F] (``extract``).

  Returns:
    a list of ``ceil(N / chunk)`` parameter states.
  """
  n = int(np.asarray(block).shape[0])
  out = [params]
  for j in range(1, -(-n // chunk)):
    now = j * chunk
    lo = max(0, now - window * chunk)
    klass, cens = distance_classes(block, lo, now)
    _, params, _ = fit(features[lo:now], klass, cens, steps=steps, batch=batch, lr=lr,
                       seed=seed + j, params=params, pred=pred)
    out.append(params)
  return out
