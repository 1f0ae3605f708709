"""The learned predictors and the ``learned`` policy: features, labels, models, training,
checkpoints, the policy in the simulator and in the cache's state, the notebook."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.layout.meta import init_meta
from kvjax.learned import features, labels, models, train
from kvjax.policies import Access, features_of, learned_policy, make_params, rank_blocks
from kvjax.policies import get_policy, register, with_model
from kvjax.sim import simulator, traces

ROOT = pathlib.Path(__file__).resolve().parents[1]


TABLE = 1031  # a small history table keeps the tests fast


@pytest.fixture(scope="module")
def small():
  return traces.generate(60, seed=3, concurrent=8, turns=(2, 6))


@pytest.fixture(scope="module")
def linear_policy():
  from kvjax.policies.contract import POLICIES

  pred, params = train.fit(*_toy_set(), kind="linear", steps=5, seed=0)[:2]
  yield pred, params, register(learned_policy(pred, params, name="test-learned-linear",
                                              table_size=TABLE))
  del POLICIES["test-learned-linear"]   # the registry is global: later modules must not see it


def _toy_set(n=256):
  t = traces.generate(60, seed=1, concurrent=4)
  f = features.extract(t.block, t.position, t.filled, t.block_size)
  k, c = labels.distance_classes(t.block)
  return f[:n], k[:n], c[:n]


# ---------------------------------------------------------------------------- features


def _python_history(block, position):
  """An independent reference: exact per-block history in dicts (no hashing)."""
  last, count, gaps, out = {}, {}, {}, []
  prev_pos, prev_count, run, rc, rg = -2, 0, 0, 0, 0
  for i, (b, p) in enumerate(zip(block.tolist(), position.tolist())):
    known = b in count
    c = count.get(b, 0)
    g = i - last[b] if known else 0
    gs = gaps.get(b, [0] * features.GAPS)
    contiguous = p == prev_pos + 1
    parent = prev_count if contiguous else 0
    if not (contiguous and p > 0):
      run, rc, rg = 0, 0, 0
    if run == p and known:
      run, rc, rg = p + 1, c, g
    out.append((c, g, list(gs), parent, run, rc, rg))
    last[b], count[b] = i, c + 1
    gaps[b] = [g] + gs[:-1] if known else [0] * features.GAPS
    prev_pos, prev_count = p, c + 1
  return out


def test_offline_features_match_an_exact_history(small):
  f = features.extract(small.block, small.position, small.filled, small.block_size,
                       table_size=10**5)   # no collisions: an exact history
  assert f.shape == (small.num_refs, features.NUM_FEATURES)
  ref = _python_history(small.block, small.position)
  c, g, gs, parent, run, rc, rg = (np.array([r[j] for r in ref]) for j in range(7))
  want = features.block_features(c, g, gs, small.position, small.filled, small.block_size,
                                 parent, run, rc, rg)
  np.testing.assert_allclose(f, np.asarray(want), rtol=0, atol=1e-6)
  assert np.all(np.isfinite(f)) and f.min() >= 0.0 and f.max() < 2.0   # log-scaled


def test_online_features_equal_offline_features(small, linear_policy):
  _, _, policy = linear_policy
  meta = init_meta(4, small.block_size)
  params = make_params(policy)
  n = small.num_refs

  def step(state, x):
    b, i, pos, fill = x
    z = jnp.int32(0)
    a = Access(slot=z - 1, key=jnp.stack([(b + 1).astype(jnp.uint32), jnp.uint32(0)]),
               hit=jnp.bool_(False), inserted=jnp.bool_(False), evicted=jnp.bool_(False),
               evicted_key=jnp.zeros(2, jnp.uint32), clock=i, next_use=z - 1, filled=fill,
               position=pos)
    return policy.update(state, meta, a, params), features_of(state, meta, a)

  xs = (jnp.asarray(small.block), jnp.arange(n, dtype=jnp.int32), jnp.asarray(small.position),
        jnp.asarray(small.filled))
  online = jax.jit(lambda s: jax.lax.scan(step, s, xs)[1])(policy.init(4))
  offline = features.extract(small.block, small.position, small.filled, small.block_size,
                             table_size=TABLE)
  np.testing.assert_allclose(np.asarray(online), offline, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- labels


def test_labels_match_brute_force_and_do_not_leak_past_the_split():
  rng = np.random.default_rng(0)
  block = rng.integers(0, 30, 400)
  cut = 250
  klass, cens = labels.distance_classes(block, 0, cut)
  for i in range(cut):   # brute force: scan forward inside the window
    j = next((j for j in range(i + 1, cut) if block[j] == block[i]), None)
    d = (j - i) if j is not None else cut - i
    assert klass[i] == np.searchsorted(labels.EDGES, d, side="right")
    assert cens[i] == (j is None)
  changed = block.copy()
  changed[cut:] = block[:cut][rng.integers(0, cut, 400 - cut)]  # the future reuses the past
  k2, c2 = labels.distance_classes(changed, 0, cut)
  np.testing.assert_array_equal(klass, k2)
  np.testing.assert_array_equal(cens, c2)
  x, k3, c3 = train.training_set(changed, np.zeros(400, int), np.full(400, 512), 512, 0, cut)
  np.testing.assert_array_equal(k3, klass)
  assert x.shape[0] == cut
  # far from the cut, a block never seen again is certain: the last class, not censored
  k4, c4 = labels.distance_classes(np.arange(70_000), 0, 70_000)
  assert k4[0] == labels.NUM_CLASSES - 1 and not c4[0] and c4[-1]


def test_reuse_within_horizon_matches_brute_force():
  rng = np.random.default_rng(1)
  block = rng.integers(0, 12, 200)
  reused, known = labels.reuse_within(block, 7, 50, 180)
  for i in range(50, 180):
    nxt = next((j for j in range(i + 1, 180) if block[j] == block[i]), None)
    assert reused[i - 50] == (nxt is not None and nxt - i <= 7)
    assert known[i - 50] == (reused[i - 50] or 179 - i >= 7)


# ---------------------------------------------------------------------------- models, training


@pytest.mark.parametrize("kind", models.KINDS)
def test_every_model_maps_features_to_class_logits(kind):
  pred, params = models.predictor(models.make_model(kind, seed=0))
  out = jax.jit(pred.predict)(params, jnp.ones((3, features.NUM_FEATURES)))
  assert out.shape == (3, labels.NUM_CLASSES) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="features"):
    pred.predict(params, jnp.ones((3, 5)))


def test_training_is_reproducible_from_a_seed_and_learns():
  x, k, c = _toy_set()
  a = train.fit(x, k, c, kind="mlp", steps=30, seed=7)
  b = train.fit(x, k, c, kind="mlp", steps=30, seed=7)
  d = train.fit(x, k, c, kind="mlp", steps=30, seed=8)
  la, lb, ld = (jax.tree.leaves(r[1]) for r in (a, b, d))
  assert all(np.array_equal(u, v) for u, v in zip(la, lb))
  assert not all(np.array_equal(u, v) for u, v in zip(la, ld))
  assert np.mean(a[2][-5:]) < a[2][0]
  # the censored loss counts the classes from the bound up (hand-worked)
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.25] + [1e-9] * (labels.NUM_CLASSES - 3)]))
  got = float(train.loss(logits, jnp.array([1]), jnp.array([True])))
  assert got == pytest.approx(-np.log(0.5), abs=1e-5)


def test_orbax_checkpoint_round_trip(tmp_path):
  pred, params = models.predictor(models.make_model("lstm", seed=2))
  train.save(str(tmp_path / "ck"), pred, params)
  pred2, params2 = train.restore(str(tmp_path / "ck"))
  assert pred2.kind == "lstm"
  x = jnp.linspace(0, 1, 2 * features.NUM_FEATURES).reshape(2, -1)
  np.testing.assert_array_equal(pred.predict(params, x), pred2.predict(params2, x))
  with pytest.raises(ValueError, match="no predictor checkpoint"):
    train.restore(str(tmp_path / "none"))


def test_online_finetuning_uses_only_the_past():
  t = traces.generate(80, seed=4, concurrent=4)
  f = features.extract(t.block, t.position, t.filled, t.block_size)
  pred, params = models.predictor(models.make_model("linear", seed=0))
  chunk = t.num_refs // 3
  out = train.finetune_stream(pred, params, t.block, f, chunk=chunk, steps=3, batch=64)
  changed = t.block.copy()
  changed[2 * chunk:] = 0                      # a different last chunk
  out2 = train.finetune_stream(pred, params, changed, f, chunk=chunk, steps=3, batch=64)
  assert len(out) == -(-t.num_refs // chunk)
  for a, b in zip(out[:3], out2[:3]):          # parameters in force up to chunk 2
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------- the policy


def test_learned_policy_in_the_simulator(small, linear_policy):
  _, _, policy = linear_policy
  prm = [make_params(policy), make_params(policy, admit=0.0)]
  full = simulator.simulate_hits(small, [16, 16], policy.name, prm, sample=10**6)
  scoring = simulator.simulate_hits(small, [16, 16], policy.name, prm, path="scoring")
  np.testing.assert_array_equal(full, scoring)   # sample >= capacity is the exact path
  # admit = 0 caches every miss, so a block referenced right after its last reference hits
  again = np.flatnonzero(small.block[1:] == small.block[:-1]) + 1
  assert full[1][again].all()
  # a block's first reference always misses
  first = np.unique(small.block, return_index=True)[1]
  assert not full[:, first].any()


def test_parameters_swap_without_recompiling(linear_policy):
  pred, params, policy = linear_policy
  meta = init_meta(16, 4).replace(filled=jnp.full(16, 4, jnp.int32),
                                  last_access=jnp.arange(16, dtype=jnp.int32))
  prm = make_params(policy)
  score = jax.jit(lambda st: policy.score(st, meta, jnp.int32(20), prm))
  st = policy.init(16)
  a = score(st)
  other = jax.tree.map(lambda v: v + 1.0, params)
  st2 = with_model(st, pred, other)
  b = score(st2)
  assert score._cache_size() == 1
  assert a.shape == b.shape == (16,)
  ranks = rank_blocks(policy, st2, jnp.ones((3, 2), jnp.uint32), jnp.arange(3),
                      jnp.full(3, 4), jnp.int32(20), 4)
  assert ranks.shape == (3,) and bool(jnp.all((ranks >= 0) & (ranks <= 1)))
  with pytest.raises(ValueError, match="learned policy"):
    rank_blocks("lru", st2, jnp.ones((1, 2), jnp.uint32), jnp.zeros(1, jnp.int32),
                jnp.ones(1, jnp.int32), jnp.int32(0), 4)


@pytest.mark.skipif(not (ROOT / "kvjax" / "learned" / "pretrained" / "kind.json").exists(),
                    reason="no shipped predictor")
def test_shipped_learned_policy_scores_a_pool():
  policy = get_policy("learned")
  st = policy.init(8)
  meta = init_meta(8, 16).replace(filled=jnp.array([16] * 7 + [0], jnp.int32),
                                  last_access=jnp.arange(8, dtype=jnp.int32),
                                  ref_count=jnp.array([1] + [0] * 7, jnp.int32))
  s = np.asarray(policy.score(st, meta, jnp.int32(50), make_params(policy)))
  assert s[0] == -np.inf and s[7] == np.inf and np.all(np.isfinite(s[1:7]))
  # equal predictions: the older page is less likely to be used within the horizon
  assert np.all(np.diff(s[1:7]) < 0)


# ---------------------------------------------------------------------------- notebook


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_in_small_mode(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(ROOT / "colab" / "learned_eviction.ipynb", as_version=4)
  env_before = os.environ.get("KVJAX_NOTEBOOK_SMALL")
  os.environ["KVJAX_NOTEBOOK_SMALL"] = "1"
  try:
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    if env_before is None:
      os.environ.pop("KVJAX_NOTEBOOK_SMALL")
    else:
      os.environ["KVJAX_NOTEBOOK_SMALL"] = env_before
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "hit ratio" in outputs
  assert (tmp_path / "hit_ratio_vs_capacity.png").exists()


def test_class_cdf_first_called_under_jit_equals_eager():
  # the class edges' log2 is computed at first use (not at import); a first use inside a
  # trace must still give concrete values (it once raised ConcretizationTypeError)
  probs = jax.nn.softmax(jnp.linspace(-1.0, 1.0, labels.NUM_CLASSES))[None]
  x = jnp.array([1.0, 300.0, 5e4])
  labels.log_edges.cache_clear()
  jitted = jax.jit(labels.class_cdf)(probs, x)
  np.testing.assert_allclose(jitted, labels.class_cdf(probs, x), rtol=1e-5, atol=1e-7)
  assert labels.log_edges()[0] == float(jnp.log2(labels.EDGES[0]))
