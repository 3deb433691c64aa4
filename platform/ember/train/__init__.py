"""The training plane: a typed run plan (`run`), its launch on Ray Train (`launch`, with the plans of `pretrain` and
`finetune`; a fine-tune's data preparation is its own step before planning), and the per-worker loop (`trainer`)
that calls the run's components: the recipe of its job kind (`recipes`: model, loss, evaluation loss, export; LoRA
in `lora`), the optimizer and its schedule (`optim`), the DeepSpeed config (`ds_config`), checkpoints (`checkpoint`,
read by `unpickling`'s safe loader) and metrics (`metrics`). `ops` builds DeepSpeed's C++ ops once, ahead of
the first run.

Evaluation lives in `ember.eval`; the run dir's file names and what a run leaves (progress, reports, tracking) in
`ember.runs`."""
