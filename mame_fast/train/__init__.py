"""Stages 3-4: spec-built models and their training: the model, the runtime (devices, ranks, precision), metrics
over a loader, checkpoints and the training state, the training loop, and the test set once."""
