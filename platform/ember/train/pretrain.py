"""`kind: pretrain`: the run plan for training a network from scratch (or from `model.init_from`) on a tokenized
corpus (a `RunPlan`, `ember.train.run`); `ember.train.launch` runs it.

Everything that can be wrong before training (dataset, vocabulary, context) fails here with one clear message,
before any worker starts; `launch` checks the rest (batch arithmetic, resources, a run dir that must not be resumed).
"""

from __future__ import annotations

from ember import storage
from ember.config.specs import PretrainSpec
from ember.data.mixture import dataset_sources, plan_mixture
from ember.data.shards import load_manifest
from ember.errors import EmberError
from ember.model import ModelConfig, builtin, preset
from ember.model.hf import bos_token_id, config_from_hf, read_json
from ember.runs.tracking import settle_tracking
from ember.train.launch import launch, resume_path
from ember.train.run import RunPlan, total_steps


def model_config(spec: PretrainSpec, manifest: dict) -> ModelConfig:
    """The network to train: `init_from`'s config, or the preset with overrides and the dataset's vocabulary."""
    m = spec.model
    if m.init_from:
        path = storage.join(builtin.resolve(m.init_from), "config.json")
        cfg = config_from_hf(read_json(path), storage.display(path))
    else:
        overrides = {k: v for k, v in m.model_dump(exclude={"preset", "init_from"}).items() if v is not None}
        try:
            cfg = preset(m.preset or "tiny", vocab_size=manifest["vocab_size"], **overrides)
        except KeyError as exc:
            raise EmberError(f"model.preset: {exc.args[0]}") from None
        except ValueError as exc:
            raise EmberError(f"model: {exc}") from None
    if manifest["vocab_size"] > cfg.vocab_size:
        raise EmberError(f"the dataset's tokenizer has {manifest['vocab_size']} tokens but the model's vocabulary "
                         f"holds {cfg.vocab_size} (model.init_from {m.init_from})")
    if manifest["seq_len"] > cfg.max_position_embeddings:
        raise EmberError(f"the dataset's rows are {manifest['seq_len']} tokens long but the model's context is "
                         f"{cfg.max_position_embeddings} (set model.max_position_embeddings or re-tokenize)")
    return cfg


def _dataset(spec: PretrainSpec) -> tuple[dict, dict | None]:
    """The manifest of data.dir, or of data.mix's first source with the mixture's record."""
    if spec.data.mix:
        mixture, manifests = plan_mixture(dataset_sources(spec.data), spec.data.exhausted, "pretrain",
                                          spec.train.global_batch_size)
        return manifests[0], mixture
    manifest = load_manifest(spec.data.dir)
    if manifest.get("kind") != "pretrain":
        raise EmberError(f"{spec.data.dir} is a {manifest.get('kind')!r} dataset; pretraining reads 'pretrain' "
                         "datasets")
    if not manifest["splits"]["train"]["rows"]:
        raise EmberError(f"{spec.data.dir} has no training rows")
    return manifest, None


def plan_pretrain(spec: PretrainSpec) -> RunPlan:
    """The run a pretrain spec asks for, checked against its dataset (or the datasets it mixes)."""
    manifest, mixture = _dataset(spec)
    cfg = model_config(spec, manifest)
    bos = bos_token_id(read_json(storage.join(builtin.resolve(spec.model.init_from), "config.json"))) \
        if spec.model.init_from else None
    spec = spec.model_copy(deep=True)  # workers run elsewhere: hand them absolute paths (or URIs)
    if spec.data.dir:
        spec.data.dir = storage.normalize(spec.data.dir)
    for source in spec.data.mix or ():
        source.dir = storage.normalize(source.dir)
    spec.output.dir = storage.normalize(spec.output.dir)
    if spec.model.init_from and not builtin.is_builtin(spec.model.init_from):  # each node resolves builtin:
        spec.model.init_from = storage.normalize(spec.model.init_from)
    settle_tracking(spec.train.tracking)
    steps = total_steps(spec, manifest, mixture)
    data_dir = spec.data.dir or mixture["sources"][0]["dir"]
    return RunPlan(spec=spec, model=cfg, data_dir=data_dir, manifest=manifest, run_dir=spec.output.dir,
                   total_steps=steps, eos_ids=(manifest["eos_id"],), start_from=resume_path(spec), bos_id=bos,
                   mixture=mixture)


def run_pretrain(spec: PretrainSpec, address: str | None = None) -> dict:
    """Trains on Ray Train with DeepSpeed; returns the last reported metrics. The model is exported to run_dir/model."""
    return launch(plan_pretrain(spec), address)
