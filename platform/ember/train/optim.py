"""The optimizer and its learning-rate schedule: AdamW's DeepSpeed config section, its parameter groups, and the
learning rate of each step (applied by the training loop, not by a DeepSpeed scheduler: it depends only on the step,
which makes resumption exact)."""

from __future__ import annotations

import math

from ember.config.specs import DeepSpeedSpec, TrainSpec


def optimizer_config(train: TrainSpec, ds: DeepSpeedSpec, use_gpu: bool) -> dict:
    """The `optimizer` section of the DeepSpeed config: torch's AdamW (`torch_adam`; on GPUs its fused CUDA kernel,
    which ships compiled with torch), and DeepSpeed's CPU Adam when the optimizer is offloaded (an op `make install`
    and the cluster image prebuild). DeepSpeed's own fused Adam would be compiled at the first step: with nvcc on a
    GPU node (a failed run where nvcc is missing or its CUDA differs from torch's), with g++ on CPU (a minute or two),
    for the same arithmetic."""
    torch_adam = {} if ds.offload_optimizer else {"torch_adam": True, **({"fused": True} if use_gpu else {})}
    return {"type": "AdamW", "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                                        "weight_decay": train.weight_decay, **torch_adam}}


def param_groups(trainable: list, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: matrices decay, vectors (norms, biases) do not."""
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def lr_at(step: int, train: TrainSpec, total_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `decay_steps` (default: the last
    step); `step` is 1-based."""
    if step <= train.warmup_steps:
        return train.lr * step / max(1, train.warmup_steps)
    horizon = train.decay_steps or total_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, horizon - train.warmup_steps))
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))
