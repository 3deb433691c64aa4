"""The training plane: the per-worker loop, the DeepSpeed config built from the spec, and Ray Train wiring."""
