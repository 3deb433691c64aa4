"""What a GPU run and a GPU replica get, checked on CPU: precision defaults that follow the device, an MFU peak for
each GPU and precision, and a loud error (not a quiet CPU fallback) for a replica given a GPU its node cannot use."""

from __future__ import annotations

import pytest
import torch

from ember.config import parse_spec
from ember.errors import EmberError


def pretrain(**sections) -> dict:
    return {"kind": "pretrain", "data": {"dir": "/data"}, "train": {"max_steps": 10}, "output": {"dir": "/runs/x"},
            **sections}


def test_training_precision_defaults_to_bf16_on_gpus_and_fp32_on_cpu():
    assert parse_spec(pretrain()).deepspeed.precision == "fp32"
    assert parse_spec(pretrain(scaling={"use_gpu": True})).deepspeed.precision == "bf16"
    chosen = parse_spec(pretrain(scaling={"use_gpu": True}, deepspeed={"precision": "fp16"}))
    assert chosen.deepspeed.precision == "fp16"
    # The resolved value is what the run's identity and spec.yaml hold.
    assert parse_spec(pretrain(scaling={"use_gpu": True})).model_dump()["deepspeed"]["precision"] == "bf16"
    with pytest.raises(Exception, match="precision"):
        parse_spec(pretrain(deepspeed={"precision": "fp8"}))


@pytest.mark.parametrize(("device", "precision", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H200", "fp32", 494.5),  # fp32 matmuls on TF32 tensor cores
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 156.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA A10G", "bf16", None),  # no published tensor-core peak: no MFU rather than a wrong one
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_the_mfu_peak_is_the_gpus_own_at_the_runs_precision(device, precision, tflops):
    from ember.train.trainer import peak_flops

    assert peak_flops(device, precision) == (tflops * 1e12 if tflops else None)


def test_serving_dtype_follows_the_device_and_a_gpu_the_node_lacks_is_an_error():
    from ember.serve.app import ServeArgs, serving_device

    assert ServeArgs(model_dir="/m").dtype == "float32"
    assert ServeArgs(model_dir="/m", num_gpus=1).dtype == "bfloat16"
    assert ServeArgs(model_dir="/m", num_gpus=1, dtype="float16").dtype == "float16"
    assert serving_device(0) == "cpu"
    if torch.cuda.is_available():
        assert serving_device(1) == "cuda"
    else:  # this machine: a CPU build of torch
        with pytest.raises(EmberError, match=r"^num_gpus is 1 but this replica's node has no CUDA device that torch "
                                             r".* can use .*serve with num_gpus: 0$"):
            serving_device(1)
