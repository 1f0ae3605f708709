"""kvjax.learned: next-use predictors for the ``learned`` eviction policy.

Modules: ``features`` (per-block features from an access-history table, the same values
offline and in the policy), ``labels`` (next-use distance classes from the future,
censored at a window's end), ``models`` (Flax NNX MLP, LSTM and Transformer) and
``train`` (Optax training, Orbax checkpoints, online fine-tuning). The policy itself is
``kvjax.policies.learned``; ``pretrained/`` holds the predictor it ships with.

>>> from kvjax.learned import features, labels
>>> features.NUM_FEATURES, labels.NUM_CLASSES
(23, 9)
"""
