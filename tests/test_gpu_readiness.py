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


def test_the_optimizer_needs_no_op_built_at_run_time():
    """Without offload, a GPU run's optimizer is torch's fused AdamW (compiled into torch), not DeepSpeed's FusedAdam
    (built with nvcc at the first step); with offload it is DeepSpeed's CPU Adam (prebuilt by `make install`). Shown
    on a real DeepSpeed engine here, in a process of its own (world size 1, gloo): torch's fused AdamW runs on CPU
    too."""
    import json
    import subprocess
    import sys

    from conftest import free_port
    from ember.train.ds_config import deepspeed_config

    gpu = parse_spec(pretrain(scaling={"use_gpu": True, "workers": 1}))
    params = deepspeed_config(gpu.train, gpu.deepspeed, 1, use_gpu=True)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    cpu = parse_spec(pretrain(scaling={"workers": 1}))
    assert "fused" not in deepspeed_config(cpu.train, cpu.deepspeed, 1, use_gpu=False)["optimizer"]["params"]
    offload = parse_spec(pretrain(scaling={"use_gpu": True, "workers": 1}, deepspeed={"offload_optimizer": True}))
    offloaded = deepspeed_config(offload.train, offload.deepspeed, 1, use_gpu=True)["optimizer"]["params"]
    assert "torch_adam" not in offloaded

    script = f"""
import json, os
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
from ember.runtime import use_environment_ninja
use_environment_ninja()
import torch, deepspeed
from ember.config import parse_spec
from ember.train.ds_config import deepspeed_config
spec = parse_spec({repr(pretrain(scaling={"use_gpu": True, "workers": 1}, deepspeed={"precision": "fp32"},
                                   train={"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2}))})
deepspeed.init_distributed("gloo")
model = torch.nn.Linear(4, 4)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), dist_init_required=False,
                                  config=deepspeed_config(spec.train, spec.deepspeed, 1, use_gpu=True))
engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
engine.step()
base = getattr(engine.optimizer, "optimizer", engine.optimizer)
print(json.dumps({{"optimizer": type(base).__module__ + "." + type(base).__name__, "fused": base.defaults["fused"]}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"optimizer": "torch.optim.adamw.AdamW", "fused": True}
