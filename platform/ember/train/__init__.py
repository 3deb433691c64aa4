"""The training plane: a typed run plan launched on Ray Train, the per-worker loop, and its components.

Evaluation lives in `ember.eval`, run records (progress, reports, tracking) in `ember.runs`."""
