"""The trainer that Ray Train runs on every worker: the loop of a run, the same for every job kind.

`train_loop_per_worker(config)` rebuilds the run plan from its `config` (`ember.train.run.RunPlan`) and runs a
`Trainer`, which calls the run's components:

    restore → (train_step → [evaluate] → record → [checkpoint]) until the last step → export

- the recipe (`ember.train.recipes`): the model, its loss and evaluation loss, what the export adds;
- the optimizer and its learning-rate schedule (`ember.train.optim`), in a DeepSpeed engine configured from the spec
  (`ember.train.ds_config`);
- checkpoints (`ember.train.checkpoint`): DeepSpeed's (each rank's shard) plus `ember_state.json` (step, samples
  consumed) in one Ray Train checkpoint; restoring one continues the same global sample order, also on another
  worker count;
- metrics (`ember.train.metrics`): each log step's row, which rank 0 writes to `metrics.jsonl` (and TensorBoard,
  the tracking runs), the progress line and the Ray metrics.

Each worker reads its slice of the shards (rank r takes global samples r, r + W, ...). Rank 0 exports the model.
The run dir is a location (`ember.storage`): in object storage, Ray Train uploads the checkpoints there (the run's
`storage_path`) and the export is uploaded with its `config.json` last.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ember import storage
from ember.data.mixture import MixtureReader, tokens_by_source, training_reader
from ember.data.shards import ShardReader
from ember.metrics import TrainMetrics
from ember.model import save_model, save_weights
from ember.runs.progress import write_progress
from ember.runs.tracking import start_tracking
from ember.runtime import debugging, quiet_libraries, use_environment_ninja
from ember.train.checkpoint import restore_record, restoring, save_checkpoint
from ember.train.ds_config import bucket_sizes, deepspeed_config, trainer_clips
from ember.train.metrics import MetricsLog, StepMetrics, mean_over_ranks, means_over_ranks, reset_peak_memory
from ember.train.optim import lr_at, param_groups
from ember.train.recipes import evaluation_losses, recipe_of, training_dtype, use_tf32
from ember.train.reference import with_reference
from ember.train.run import RunPlan

log = logging.getLogger("ember")


def to_device(batch, device):
    """A reader batch (an array, or a dict of arrays for fine-tuning data) as tensors on `device`."""
    if isinstance(batch, dict):
        return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    return torch.from_numpy(batch).to(device)


def _not_finite(loss: float, grad_norm: float | None) -> tuple[str, float] | None:
    if not math.isfinite(loss):
        return "training loss", loss
    if grad_norm is not None and not math.isfinite(grad_norm):
        return "gradient norm", grad_norm
    return None


@dataclass
class Overflows:
    """fp16's dynamic loss scaling skips an optimizer step whose scaled gradients overflowed (DeepSpeed halves the
    scale and reports an infinite gradient norm): normal early in a run, so such a step is counted, not fatal;
    more than `limit` of them in a row is (the scale has run out, or the gradients themselves are not finite)."""

    limit: int
    in_a_row: int = 0
    total: int = 0

    def observe(self, skipped: bool) -> bool:
        """Counts a step; True when the run must stop."""
        if not skipped:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        return self.in_a_row > self.limit


class Trainer:
    """One worker's part of a run, in named steps (see the module docstring). Reads only its plan."""

    def __init__(self, plan: RunPlan):
        self.plan, self.spec, self.recipe = plan, plan.spec, recipe_of(plan.spec)
        self.run_dir = plan.run_dir
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.step, self.samples = 0, 0
        self.overflows = Overflows(self.spec.train.max_overflow_steps)
        self.ds_config = deepspeed_config(self.spec.train, self.spec.deepspeed, self.world,
                                          self.spec.scaling.use_gpu)

    def restore(self) -> dict | None:
        """Builds the model and its DeepSpeed engine, loading the checkpoint to continue from (see
        `ember.train.checkpoint.restoring`). Returns what was restored, for restores.jsonl, or None."""
        import deepspeed  # in the workers only: the driver imports this module to hand Ray Train the loop

        torch.manual_seed(self.spec.train.seed)  # the same initial weights on every rank
        model, trainable = self.recipe.build(self.plan, self.device)
        model.config.gradient_checkpointing = self.spec.deepspeed.activation_checkpointing
        self.ds_config["zero_optimization"].update(bucket_sizes(
            self.spec.deepspeed, model.config.hidden_size, sum(p.numel() for p in model.layers[0].parameters())))
        with restoring(self.plan.start_from, self.spec.trust_checkpoint, self.rank, self.world,
                       self.ds_config) as found:
            # DeepSpeed prints its op builds ("... op built successfully"); --debug shows them.
            with contextlib.nullcontext() if debugging() else contextlib.redirect_stdout(io.StringIO()):
                self.engine, _, _, _ = deepspeed.initialize(
                    model=model, model_parameters=param_groups(trainable, self.spec.train.weight_decay),
                    config=self.ds_config, dist_init_required=False)
            if found is None:
                return None
            self.engine.load_checkpoint(str(found.directory), tag=found.tag)
        self.step, self.samples = found.state["step"], found.state["samples"]
        return restore_record(found, self.rank, self.world, self.device)

    def train_step(self, batches) -> tuple[float, float | None, float, bool, dict[str, float]]:
        """One optimizer step (gradient accumulation inside): (mean loss over ranks, grad norm, learning rate, whether
        fp16's loss scaling skipped the update for an overflow, the recipe's figures as means over micro-batches and
        ranks)."""
        self.step += 1
        lr = lr_at(self.step, self.spec.train, self.plan.total_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        losses, figures, skipped_before, grad_norm = [], [], self.engine.skipped_steps, None
        micro_steps = self.ds_config["gradient_accumulation_steps"]
        for micro in range(micro_steps):
            batch, self.samples = next(batches)
            loss, figured = self.recipe.loss(self.engine, to_device(batch, self.device))
            figures.append({k: v.detach() for k, v in figured.items()})
            self.engine.backward(loss)  # at the last micro-batch: the gradients averaged over ranks
            if micro == micro_steps - 1 and trainer_clips(self.spec.deepspeed):
                grad_norm = self.clip_gradients()
            self.engine.step()
            losses.append(loss.detach())
        grad_norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
        skipped = self.spec.deepspeed.precision == "fp16" and self.engine.skipped_steps > skipped_before
        means = means_over_ranks({"loss": torch.stack(losses).mean(),
                                  **{k: torch.stack([f[k] for f in figures]).mean() for k in figures[0]}})
        return means.pop("loss"), float(grad_norm) if grad_norm is not None else None, lr, skipped, means

    def clip_gradients(self) -> torch.Tensor:
        """The norm of the whole gradient, and the gradient clipped to train.grad_clip (see `trainer_clips`)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.spec.train.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.engine.module.parameters(), self.spec.train.grad_clip, norm)
        return norm

    def stop_if_not_finite(self, loss: float, grad_norm: float | None, skipped: bool) -> bool:
        """Every rank sees the same all-reduced figures (and the same loss-scale overflow), so all stop here together,
        without a retry; the driver raises the error rank 0 writes. The last good checkpoint stays. An fp16 step
        skipped for an overflow is counted and logged, not fatal, up to train.max_overflow_steps in a row."""
        bad = _not_finite(loss, None if skipped else grad_norm)
        too_many = self.overflows.observe(skipped)
        if skipped and not too_many and not bad and self.rank == 0:
            scale = getattr(self.engine.optimizer, "loss_scale", None) or getattr(self.engine.optimizer, "cur_scale", 0)
            log.info("step %d: fp16 gradients overflowed, update skipped, loss scale now %g (%d in a row, %d in all)",
                     self.step, scale, self.overflows.in_a_row, self.overflows.total)
        if too_many:
            bad = ("fp16 loss scale", f"overflowing for {self.overflows.in_a_row} steps in a row (more than "
                                      f"train.max_overflow_steps: {self.spec.train.max_overflow_steps})")
        if bad and self.rank == 0:
            storage.write_json(self.plan.dir.error, {"step": self.step, "error": (
                f"the {bad[0]} is {bad[1]} at step {self.step}; stopped there. The last good checkpoint is kept in "
                "the run dir (lower train.lr, raise train.warmup_steps, or check the data)")})
        return bad is not None

    def evaluate(self, reader: ShardReader | MixtureReader) -> dict:
        """The loss over the first train.eval_batches micro batches of val/ per rank (the same ones every time):
        the mean of their losses, over ranks."""
        tr = self.spec.train
        micro = reader.batches(tr.micro_batch_size, start=0)
        batches = (to_device(next(micro)[0], self.device) for _ in range(tr.eval_batches))
        losses, _ = evaluation_losses(self.recipe, self.engine, batches)
        val_loss = mean_over_ranks(losses.mean())
        if not self.recipe.has_perplexity:
            return {"val_loss": val_loss}
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def record(self, metrics: dict, metrics_log: MetricsLog, gauges) -> None:
        """Rank 0: the metrics row, the Ray metrics, the progress line and the progress record."""
        metrics_log.write(metrics)
        gauges.record({"loss": metrics["loss"], "val_loss": metrics.get("val_loss"), "learning_rate": metrics["lr"],
                       "grad_norm": metrics["grad_norm"], "tokens_per_second": metrics["tokens_per_s"],
                       "mfu": metrics.get("mfu"), "step": self.step, "step_time_seconds": metrics["step_time_s"]})
        val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        val += f" (ppl {metrics['val_ppl']:.1f})" if "val_ppl" in metrics else ""
        val += f", reward accuracy {metrics['rewards/accuracies']:.2f}" if "rewards/accuracies" in metrics else ""
        log.info("step %d/%d  loss %.4f%s  lr %.2e  grad norm %.3f  %s tokens/s", self.step, self.plan.total_steps,
                 metrics["loss"], val, metrics["lr"], metrics["grad_norm"] or 0.0, f"{metrics['tokens_per_s']:,.0f}")
        sources = {k.removeprefix("tokens/"): v for k, v in metrics.items() if k.startswith("tokens/")}
        write_progress(self.run_dir, {"kind": "train", "step": self.step, "total_steps": self.plan.total_steps,
                                      "loss": metrics["loss"], "tokens_per_s": metrics["tokens_per_s"],
                                      "val_loss": metrics.get("val_loss"), **({"source_tokens": sources}
                                                                             if sources else {})})

    def report(self, metrics: dict, metrics_log: MetricsLog | None, gauges, save_now: bool) -> None:
        """Rank 0 records the row; every rank reports it to Ray Train, with a checkpoint when one is due."""
        if self.rank == 0:
            self.record(metrics, metrics_log, gauges)
        if not save_now:
            ray.train.report(metrics)
            return
        self.save(metrics)
        if self.rank == 0:
            metrics_log.sync()

    def save(self, metrics: dict) -> None:
        """Reports the metrics with a checkpoint (see `ember.train.checkpoint.save_checkpoint`)."""
        state = {"step": self.step, "samples": self.samples, "world_size": self.world,
                 "spec": json.loads(self.spec.model_dump_json())}
        save_checkpoint(self.engine, state, self.rank, metrics)

    def export(self) -> None:
        """Writes the trained model as a model dir of its family (all ranks call), in the training precision (bf16
        by default on GPUs). ZeRO 3: the shards are gathered to rank 0 in 16 bits and written as they are, with no
        model built for them, except LoRA's, whose adapters are merged on a model first."""
        out = self.plan.dir.model
        dtype = training_dtype(self.spec)
        eos = list(self.plan.eos_ids) if len(self.plan.eos_ids) > 1 else self.plan.eos_ids[0]
        model = state = None
        if self.spec.deepspeed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective: rank 0 receives the full state
            if self.rank == 0 and not self.recipe.exports_from_state(self.plan):
                torch.manual_seed(0)
                model = self.recipe.skeleton(self.plan)
                model.load_state_dict(state, strict=False)
                state = None
        else:
            model = self.engine.module
        if self.rank == 0:
            if model is not None:
                self.recipe.before_export(model, self.plan, out)
                model.config.gradient_checkpointing = False
                save_model(model, out, tokenizer_dir=self.plan.data_dir, dtype=dtype, eos_token_id=eos,
                           bos_token_id=self.plan.bos_id)
            else:
                save_weights(state, self.plan.model, out, tokenizer_dir=self.plan.data_dir, dtype=dtype,
                             eos_token_id=eos, bos_token_id=self.plan.bos_id)
            log.info("model exported to %s", storage.display(out))
        if dist.is_initialized():
            dist.barrier()

    def due(self, step: int, validating: bool) -> tuple[bool, bool, bool]:
        """Whether `step` logs, evaluates and checkpoints (the last step does all three)."""
        tr, last = self.spec.train, step == self.plan.total_steps
        log_now = step % tr.log_every == 0 or last
        eval_now = validating and (bool(tr.eval_every and step % tr.eval_every == 0) or last)
        save_now = bool(tr.checkpoint_every and step % tr.checkpoint_every == 0) or last
        return log_now, eval_now, save_now

    def run(self) -> None:
        plan, tr, rank = self.plan, self.spec.train, self.rank
        # The data first: a dataset whose manifest or local shards are missing fails before the engine is built (a
        # bucket's shards are fetched, and checked, as the samples reach them).
        readers = {split: training_reader(plan.data_dir, plan.mixture, split, seed=tr.seed, rank=rank,
                                          world_size=self.world, block_bytes=plan.block_bytes)
                   for split in ("train", "val")}
        if plan.reference:  # a full preference fine-tune: each pair's reference log-probabilities
            readers = {split: with_reference(reader, plan.reference, split) for split, reader in readers.items()}
        try:
            self.train(readers["train"], readers["val"])
        finally:
            for reader in readers.values():
                if reader is not None:
                    reader.close()

    def train(self, reader: ShardReader | MixtureReader, val_reader: ShardReader | MixtureReader | None) -> None:
        """Restore, then step until the run's last step, logging, evaluating and checkpointing as due; export."""
        plan, tr, rank = self.plan, self.spec.train, self.rank
        restored = self.restore()
        if rank == 0:  # training starts: the result of the run this one continues no longer describes the run dir
            storage.delete(plan.dir.result)
        reset_peak_memory(self.device)
        batches = reader.batches(tr.micro_batch_size, start=self.samples)
        tracker = start_tracking(plan) if rank == 0 else None
        metrics_log = MetricsLog(self.run_dir, self.step, tr.tensorboard, restored, tracker) if rank == 0 else None
        gauges = TrainMetrics(self.spec.name or storage.name(self.run_dir)) if rank == 0 else None
        meter = StepMetrics(plan, self.engine, self.device, self.world, self.recipe.rows_per_sample)
        while self.step < plan.total_steps:
            loss, grad_norm, lr, skipped, figures = self.train_step(batches)
            meter.stepped()
            if self.stop_if_not_finite(loss, grad_norm, skipped):
                if rank == 0:
                    metrics_log.close()
                return
            log_now, eval_now, save_now = self.due(self.step, val_reader is not None)
            if not (log_now or eval_now or save_now):
                continue
            metrics = {**meter.row(self.step, self.samples, loss, lr, grad_norm, self.overflows.total), **figures}
            if plan.mixture:
                metrics.update({f"tokens/{name}": n for name, n in
                                tokens_by_source(plan.mixture, self.samples, plan.manifest["seq_len"]).items()})
            if eval_now:
                metrics.update(self.evaluate(val_reader))
            self.report(metrics, metrics_log, gauges, save_now)
            meter.restart()
        self.export()
        if rank == 0:
            metrics_log.close()


def train_loop_per_worker(config: dict) -> None:
    quiet_libraries()
    use_environment_ninja()
    use_tf32()
    Trainer(RunPlan.from_config(config)).run()
