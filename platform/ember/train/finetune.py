"""`kind: finetune`: supervised fine-tuning on conversations, full or LoRA, on the pretraining machinery.

The driver checks the base model dir, tokenizes the conversations with its tokenizer and chat template (Ray Data,
`ember.data.sft`; reused when unchanged), then runs the same Ray Train + DeepSpeed loop as pretraining with a loss
mask: only assistant tokens carry loss unless `data.train_on: all`. The run dir gets `model/` (servable, with the chat
template in its tokenizer_config.json) and, for LoRA, `adapter/` (PEFT format; merged into `model/` as well).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ember.config.specs import FinetuneSpec
from ember.data.sft import prepare_chat_dataset
from ember.data.tokenizer import load_tokenizer, tokenizer_file, turn_end_ids
from ember.errors import EmberError
from ember.model.hf import config_from_hf, read_json, weights_fingerprint
from ember.train.pretrain import SNAPSHOT, launch

log = logging.getLogger("ember")


def run_finetune(spec: FinetuneSpec, address: str | None = None) -> dict:
    """Fine-tunes `spec.base` on `spec.data`; returns the last reported metrics."""
    base = Path(spec.base).expanduser().resolve()
    if not (base / "config.json").is_file():
        raise EmberError(f"base: {base} is not a model directory (no config.json)")
    cfg = config_from_hf(read_json(base / "config.json"), str(base / "config.json"))
    try:
        tokenizer_file(base)
    except EmberError:
        raise EmberError(f"base: {base} has no tokenizer.json; a model dir for fine-tuning needs its tokenizer") \
            from None
    run_dir = Path(spec.output.dir).expanduser().resolve()
    if spec.resume == "never" and (run_dir / SNAPSHOT).is_file():
        raise EmberError(f"{run_dir} holds checkpoints of an earlier run and resume is 'never'; set resume: auto to "
                         "continue it, or choose another output.dir")
    data_dir = Path(spec.data.dir).expanduser().resolve() if spec.data.dir else run_dir / "data"
    resuming = spec.resume == "auto" and (run_dir / SNAPSHOT).is_file()
    manifest = prepare_chat_dataset(spec.data, base, data_dir, cfg.max_position_embeddings, address,
                                    locked_by=str(run_dir) if resuming else None)
    cfg.vocab_size = max(cfg.vocab_size, manifest["vocab_size"])
    tok = load_tokenizer(data_dir)
    eos_ids = [manifest["eos_id"], *turn_end_ids(tok)]
    spec = spec.model_copy(deep=True)  # workers run elsewhere: hand them absolute paths
    spec.base = str(base)
    log.info("finetune: %s from %s, %s", spec.method, base,
             f"rank {spec.lora.rank} on {', '.join(spec.lora.target_modules)}" if spec.method == "lora" else
             "every weight")
    # The base's weights are part of what the run is: checkpoints made from another version of the base (one
    # retrained in place since) must not be continued, nor a finished run of it reused.
    fingerprint = weights_fingerprint(base)
    stamp = run_dir / "base_weights"
    if resuming and stamp.is_file() and stamp.read_text() != fingerprint:
        raise EmberError(f"{run_dir} holds a fine-tune of an earlier version of {base} (its weights changed since); "
                         "delete that directory or choose another output.dir to fine-tune the new base")
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return launch(spec, cfg, manifest, str(data_dir), address,
                  extra={"eos_ids": sorted(set(eos_ids)), "base_weights": fingerprint})
