"""Training side: model zoo, datasets, presets, training loop and evaluation.

Kept import-light on purpose: the model archive packs `training.models`, `training.presets` and
`training.checkpoint` into each .mar, and a TorchServe worker must not pull in matplotlib or tensorboard.
"""
