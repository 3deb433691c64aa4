"""What differs between training job kinds, declared once (`Recipe`) and chosen once per run: the model a worker
builds, the loss it trains on, the loss it is evaluated by, and what the export adds. The trainer
(`ember.train.trainer`) is the same for every kind, and `evaluation_losses` is the one loop that scores a dataset
with a recipe (the trainer's validation and `kind: evaluate`'s dataset loss alike).

- `Pretraining`: builds the network of the plan (or loads `model.init_from`); next-token cross-entropy over every
  position of a packed row.
- `SupervisedFinetuning`: loads the base, grows its vocabulary to the dataset's tokenizer, with LoRA freezes it under
  adapters; cross-entropy over the targets whose loss mask is 1, each packed conversation attending only to itself
  (segments); with LoRA the export also saves the adapters (PEFT format, `adapter/` beside the model) and merges them.
- `PreferenceTuning`: the same model and export as supervised fine-tuning; the loss of `preference` (DPO, IPO, SimPO,
  ORPO: `ember.train.preference_loss`) over each row's chosen and rejected answers, against the reference: with LoRA
  the base itself (the adapters off, no second copy), with full fine-tuning the log-probabilities computed once
  before training (`ember.train.reference`) that the batches carry.

`Recipe.loss` returns the loss and the figures a kind logs beside it (the preference rewards), which the trainer
averages over micro-batches and ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ember import storage
from ember.errors import EmberError
from ember.model import Transformer, build_model, load_model, resize_vocab
from ember.runs.run_dir import RunDir
from ember.train.lora import adapter_state, adapters_disabled, apply_lora, merge_lora, save_adapter
from ember.train.preference_loss import pair_logps, preference_loss

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_tf32() -> None:
    """fp32 matmuls on TF32 tensor cores where there is a GPU (what the MFU peak of fp32 assumes): in the trainer and
    in whatever must compute what it computes (a full preference fine-tune's reference pass)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def training_dtype(spec) -> torch.dtype:
    """The dtype a run's model is built in, trained in (DeepSpeed keeps fp32 masters) and exported in."""
    return PRECISIONS[spec.deepspeed.precision]


def next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over rows of ids (B, T + 1)."""
    logits = model(ids[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def masked_cross_entropy(logits, targets, mask) -> torch.Tensor:
    """Mean cross-entropy over the targets whose mask is non-zero; the others' labels are never read."""
    targets = targets.masked_fill(mask == 0, -100)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def supervised_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy over the assistant targets of fine-tuning rows (input_ids, loss_mask, segments: (B, T + 1))."""
    ids = batch["input_ids"]
    logits = model(ids[:, :-1], segments=batch["segments"][:, :-1])
    return masked_cross_entropy(logits, ids[:, 1:], batch["loss_mask"][:, 1:])


@runtime_checkable
class Recipe(Protocol):
    """What a training job kind supplies to the trainer. `plan` is the run's `ember.train.run.RunPlan`."""

    rows_per_sample: int  # sequences of seq_len the model runs per sample (a preference pair: two)
    has_perplexity: bool  # whether exp(validation loss) means anything (not for a preference loss)

    def build(self, plan, device="cpu") -> tuple[Transformer, list]:
        """The model to train, made on `device` in the training precision, and its trainable parameters."""

    def skeleton(self, plan) -> Transformer:
        """A model of the trained shape (on CPU), to load gathered ZeRO-3 weights into for the export."""

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch of the recipe's dataset kind, and the figures logged beside it (scalars)."""

    def evaluation_loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(mean loss, number of targets it is the mean over) of a batch."""

    def exports_from_state(self, plan) -> bool:
        """Whether ZeRO 3's gathered weights are the export as they are (no model built for them)."""

    def before_export(self, model, plan, out: str) -> None:
        """What the export adds, on the trained model, before it is written to `out`."""


class Pretraining:
    rows_per_sample, has_perplexity = 1, True

    def build(self, plan, device="cpu") -> tuple[Transformer, list]:
        """The model to train, made on `device` in the training precision (never first in host memory, never in fp32
        for a 16-bit run), and its trainable parameters."""
        init_from, dtype = plan.spec.model.init_from, training_dtype(plan.spec)
        model = (load_model(init_from, device=device, dtype=dtype) if init_from
                 else build_model(plan.model, device, dtype))
        return model, list(model.parameters())

    def skeleton(self, plan) -> Transformer:
        return build_model(plan.model, "cpu", training_dtype(plan.spec))

    def loss(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return next_token_loss(model, batch), {}

    def evaluation_loss(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        return next_token_loss(model, batch), batch[:, 1:].numel()

    def exports_from_state(self, plan) -> bool:
        """ZeRO 3's gathered weights are the export as they are: no model is built for it."""
        return True

    def before_export(self, model, plan, out: str) -> None:
        """Nothing to add: the model is the export."""


class SupervisedFinetuning:
    rows_per_sample, has_perplexity = 1, True

    def build(self, plan, device="cpu") -> tuple[Transformer, list]:
        spec = plan.spec
        model = load_model(spec.base, device=device, dtype=training_dtype(spec))
        resize_vocab(model, max(plan.manifest["vocab_size"], model.config.vocab_size))
        if spec.method == "lora":
            return model, apply_lora(model, spec.lora)
        return model, list(model.parameters())

    def skeleton(self, plan) -> Transformer:
        """A model of the trained shape (LoRA's adapters in place), to load gathered ZeRO-3 weights into."""
        return self.build(plan)[0]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        return supervised_loss(model, batch), {}

    def evaluation_loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return supervised_loss(model, batch), (batch["loss_mask"][:, 1:] != 0).sum()

    def exports_from_state(self, plan) -> bool:
        """A full fine-tune's gathered ZeRO-3 weights are its export; LoRA's need the adapters merged, on a model."""
        return plan.spec.method != "lora"

    def before_export(self, model, plan, out: str) -> None:
        """With LoRA: the adapters on their own (PEFT format, `adapter/` beside the model), then merged."""
        if plan.spec.method != "lora":
            return
        save_adapter(adapter_state(model), plan.spec.lora, plan.spec.base,
                     storage.join(storage.parent(out), RunDir.ADAPTER))
        merge_lora(model)


REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # what a full fine-tune's batches carry besides


class PreferenceTuning(SupervisedFinetuning):
    """`kind: preference` (see the module docstring). `cfg` is the spec's `preference` section."""

    rows_per_sample, has_perplexity = 2, False

    def __init__(self, cfg, method: str):
        self.cfg, self.method = cfg, method

    def reference(self, model, batch: dict) -> dict | None:
        """The reference's log-probabilities of the batch's answers: None for a reference-free loss; with LoRA the
        base's (the adapters off, no gradient); with full fine-tuning those the batch carries."""
        if not self.cfg.needs_reference:
            return None
        if self.method == "lora":
            with torch.no_grad(), adapters_disabled(model):
                return {k: v.detach() for k, v in pair_logps(model, batch).items()}
        return {"chosen_logps": batch[REFERENCE_COLUMNS[0]], "rejected_logps": batch[REFERENCE_COLUMNS[1]]}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        return preference_loss(self.cfg, pair_logps(model, batch), self.reference(model, batch))

    def evaluation_loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        return self.loss(model, batch)[0], batch["input_ids"].shape[0]


RECIPES: dict[str, Recipe] = {"pretrain": Pretraining(), "finetune": SupervisedFinetuning()}


def recipe_of(spec) -> Recipe:
    """The recipe of a training spec's kind (a preference run's carries its loss settings)."""
    if spec.kind == "preference":
        return PreferenceTuning(spec.preference, spec.method)
    return RECIPES[spec.kind]


def dataset_recipe(manifest: dict, where: str) -> Recipe:
    """The recipe a dataset's rows are scored with: fine-tuning rows (`kind: sft`) by the supervised loss. A
    preference dataset has no loss of its own (its pairs are scored by `kind: evaluate`'s data.pairs)."""
    if manifest.get("kind") == "preference":
        raise EmberError(f"{where} holds preference pairs, which have no dataset loss: evaluate them with "
                         "data.pairs (their pair files) instead of data.dir")
    return RECIPES["finetune" if manifest.get("kind") == "sft" else "pretrain"]


@torch.no_grad()
def evaluation_losses(recipe: Recipe, model, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch's (mean loss, targets) by the recipe's evaluation loss, in eval mode: two tensors (batches,), left on
    the model's device (no host sync per batch). The trainer's validation loss is their mean, a dataset's loss their
    mean weighted by targets."""
    training = model.training
    model.eval()
    losses, targets = [], []
    for batch in batches:
        loss, count = recipe.evaluation_loss(model, batch)
        losses.append(loss)
        targets.append(torch.as_tensor(count, device=loss.device))
    model.train(training)
    if not losses:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.stack(losses), torch.stack(targets)
