"""The DeepSpeed config, built in one place from a training spec."""

from __future__ import annotations

from ember.config.specs import DeepSpeedSpec, TrainSpec
from ember.errors import EmberError
from ember.train.optim import optimizer_config


def grad_accumulation(global_batch: int, micro_batch: int, workers: int) -> int:
    """Micro batches per worker per optimizer step; the global batch must split evenly."""
    per_step = micro_batch * workers
    if global_batch % per_step:
        raise EmberError(f"train.global_batch_size ({global_batch}) must be a multiple of train.micro_batch_size × "
                         f"scaling.workers ({micro_batch} × {workers} = {per_step})")
    return global_batch // per_step


def trainer_clips(ds: DeepSpeedSpec) -> bool:
    """Whether the training loop measures and clips the gradient norm itself: for fp32 at ZeRO stage 0, DeepSpeed's
    engine clips with torch's basic optimizer but keeps no norm (`get_global_grad_norm()` is None), so the loop does
    both in one pass (`clip_grad_norm_`'s arithmetic) and the config turns DeepSpeed's clipping off."""
    return ds.zero_stage == 0 and ds.precision == "fp32"


def bucket_sizes(ds: DeepSpeedSpec, hidden_size: int, layer_params: int) -> dict:
    """ZeRO's communication buffers and stage 3's gathered-parameter limits, in elements, for the
    `zero_optimization` section: the spec's values, else scaled to the model (`hidden_size`, and `layer_params`, the
    parameters of one decoder layer). The buckets follow Hugging Face's `auto` rule (hidden², 0.9 hidden², 10
    hidden). DeepSpeed's own defaults (5e8-element buckets, 1e9 live parameters) exceed every model under a few
    billion parameters, so on those a stage saves less than it could: stages 1-2 hold a whole flat gradient buffer and
    stage 3 keeps every gathered parameter through the step."""
    if ds.zero_stage == 0:
        return {}
    chosen = {"reduce_bucket_size": ds.reduce_bucket_size or hidden_size ** 2}
    if ds.zero_stage < 3:
        chosen["allgather_bucket_size"] = ds.allgather_bucket_size or hidden_size ** 2
        return chosen
    return {**chosen,
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size or int(0.9 * hidden_size ** 2),
            "stage3_param_persistence_threshold": (10 * hidden_size if ds.stage3_param_persistence_threshold is None
                                                   else ds.stage3_param_persistence_threshold),
            "stage3_max_live_parameters": ds.stage3_max_live_parameters or 2 * layer_params,
            "stage3_max_reuse_distance": (layer_params if ds.stage3_max_reuse_distance is None
                                          else ds.stage3_max_reuse_distance)}


def deepspeed_config(train: TrainSpec, ds: DeepSpeedSpec, workers: int, use_gpu: bool = True) -> dict:
    """The DeepSpeed JSON config. The optimizer section and the learning rate schedule are `ember.train.optim`'s
    (the schedule is applied by the training loop, so no DeepSpeed scheduler is configured)."""
    if ds.offload_params and ds.zero_stage != 3:
        raise EmberError(f"deepspeed.offload_params needs deepspeed.zero_stage: 3 (got {ds.zero_stage})")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise EmberError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.overlap_comm is not None:
        zero["overlap_comm"] = ds.overlap_comm
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation(train.global_batch_size, train.micro_batch_size, workers),
        "gradient_clipping": 0.0 if trainer_clips(ds) else train.grad_clip,
        "optimizer": optimizer_config(train, ds, use_gpu),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0,  # 0: dynamic loss scaling
                 "initial_scale_power": ds.fp16_initial_scale_power},
        **({"data_types": {"grad_accum_dtype": ds.grad_accum_dtype}} if ds.grad_accum_dtype else {}),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
