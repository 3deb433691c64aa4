"""What a GPU run and a GPU replica get, checked on CPU: precision defaults that follow the device, an MFU peak for
each GPU and precision, and a loud error (not a quiet CPU fallback) for a replica given a GPU its node cannot use."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

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


def test_gpu_runs_overlap_the_reduction_sum_gradients_in_fp32_and_give_workers_cpus():
    from ember.train.ds_config import deepspeed_config

    gpu = parse_spec(pretrain(scaling={"use_gpu": True}))
    ds = gpu.deepspeed
    assert (ds.overlap_comm, ds.grad_accum_dtype, gpu.scaling.cpus_per_worker) == (True, "fp32", 8)
    config = deepspeed_config(gpu.train, gpu.deepspeed, 2, use_gpu=True)
    assert config["zero_optimization"]["overlap_comm"] is True and config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert gpu.scaling.worker_resources() == {"CPU": 8, "GPU": 1}
    # CPU runs keep DeepSpeed's defaults: the figures of every CPU run are unchanged.
    cpu = parse_spec(pretrain())
    assert (cpu.deepspeed.overlap_comm, cpu.deepspeed.grad_accum_dtype, cpu.scaling.cpus_per_worker) == (None, None, 1)
    config = deepspeed_config(cpu.train, cpu.deepspeed, 2, use_gpu=False)
    assert "overlap_comm" not in config["zero_optimization"] and "data_types" not in config
    # ZeRO 3 sums in the training precision (DeepSpeed has no fp32 accumulation there); asking for it is an error.
    zero3 = parse_spec(pretrain(scaling={"use_gpu": True}, deepspeed={"zero_stage": 3}))
    assert zero3.deepspeed.grad_accum_dtype is None and zero3.deepspeed.overlap_comm is True
    with pytest.raises(EmberError, match=r"deepspeed.grad_accum_dtype: fp32 differs from the precision \(bf16\), "
                                         r"which DeepSpeed supports with ZeRO 1 and 2 only \(zero_stage is 0\)"):
        parse_spec(pretrain(deepspeed={"zero_stage": 0, "precision": "bf16", "grad_accum_dtype": "fp32"}))


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
    from ember.train.metrics import peak_flops

    assert peak_flops(device, precision) == (tflops * 1e12 if tflops else None)


def test_a_gpu_replica_is_bf16_with_a_bundle_per_tensor_parallel_rank():
    """What vLLM is started with on GPUs, built here without one: bf16 by default, one placement-group bundle (a GPU
    and a CPU) per rank, tensor_parallel_size the replica's GPUs, the KV cache by gpu_memory_utilization when
    kv_cache_memory_gb is null; on CPU a bundle of the replica's CPUs, fp32, eager, the KV cache in bytes."""
    from ember.serve.app import llm_config
    from ember.serve.args import ServeArgs

    facts = {"name": "m", "max_model_len": 4096, "vocab_size": 100, "chat_template": True}
    assert ServeArgs(model_dir="/m").dtype == "float32"
    assert ServeArgs(model_dir="/m", num_gpus=1, dtype="float16").dtype == "float16"
    gpu = llm_config(ServeArgs(model_dir="/m", num_gpus=2, kv_cache_memory_gb=None, accelerator_type="H100"), facts)
    assert gpu.placement_group_config["bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert gpu.accelerator_type == "H100"
    engine = gpu.engine_kwargs
    assert engine["dtype"] == "bfloat16" and engine["tensor_parallel_size"] == 2
    assert engine["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in engine
    assert "enforce_eager" not in engine and engine["load_format"] == "safetensors"
    cpu = llm_config(ServeArgs(model_dir="/m", num_cpus=2, kv_cache_memory_gb=0.5), facts)
    assert cpu.placement_group_config["bundles"] == [{"CPU": 2}]
    assert cpu.engine_kwargs["kv_cache_memory_bytes"] == 1 << 29 and cpu.engine_kwargs["enforce_eager"]
    with pytest.raises(ValidationError, match="a CPU replica needs a KV cache size"):
        ServeArgs(model_dir="/m", kv_cache_memory_gb=None)


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
seen = {{"optimizer": type(base).__module__ + "." + type(base).__name__, "fused": base.defaults["fused"]}}
# The GPU defaults on a bf16 ZeRO-2 engine with 2 micro-batches per step: gradients summed in fp32.
spec = parse_spec({repr(pretrain(scaling={"use_gpu": True, "workers": 1},
                                   train={"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 2}))})
model = torch.nn.Linear(4, 4)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), dist_init_required=False,
                                  config=deepspeed_config(spec.train, spec.deepspeed, 1, use_gpu=True))
for _ in range(2):
    engine.backward(engine(torch.randn(2, 4, dtype=torch.bfloat16)).float().pow(2).mean())
    engine.step()
seen.update(accumulates_in=str(engine.optimizer.gradient_accumulation_dtype), overlap=engine.zero_overlap_comm())
print(json.dumps(seen))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"optimizer": "torch.optim.adamw.AdamW", "fused": True,
                                                               "accumulates_in": "torch.float32", "overlap": True}


def test_placement_arithmetic_of_node_types_follows_the_placement_strategy():
    """What ember.cluster.capacity counts when it decides that a job can never fit (the end-to-end refusal and wait
    are in test_autoscaling, on a real autoscaling cluster)."""
    from ember.cluster.capacity import NodeType, _placeable

    gpu8 = NodeType("gpu-8", {"CPU": 192, "GPU": 8, "memory": 2e12}, max_count=4)
    head = NodeType("head", {"CPU": 4}, max_count=0)
    worker = {"CPU": 8, "GPU": 1}
    assert gpu8.holds(worker) == 8 and head.holds(worker) == 0 and gpu8.holds({"CPU": 0.5}) == 384
    assert _placeable([(gpu8, 4)], worker, "PACK") == 32
    assert _placeable([(gpu8, 4)], worker, "STRICT_PACK") == 8  # all on one node
    assert _placeable([(gpu8, 4)], worker, "STRICT_SPREAD") == 4  # one per node
    assert _placeable([(head, 1)], worker, "SPREAD") == 0
    assert gpu8.describe() == "gpu-8 (CPU 192, GPU 8; up to 4)"
    assert NodeType("any", {"CPU": 2}, None).describe() == "any (CPU 2; no limit)"


def test_fp16_overflow_steps_are_counted_and_only_a_run_of_them_stops_training():
    """The policy the trainer applies to each step DeepSpeed's fp16 loss scaling skipped (the engine itself needs a
    GPU: DeepSpeed's CPU accelerator has no fp16; test_pretrain's gpu test runs one through overflows)."""
    from ember.train.trainer import Overflows

    overflows = Overflows(limit=3)
    seen = [overflows.observe(s) for s in (True, True, True, False, True, True, True)]
    assert seen == [False] * 7 and (overflows.total, overflows.in_a_row) == (6, 3)
    assert overflows.observe(True) is True  # a 4th in a row: past the limit
    spec = parse_spec(pretrain(scaling={"use_gpu": True}, deepspeed={"precision": "fp16"}))
    from ember.train.ds_config import deepspeed_config

    config = deepspeed_config(spec.train, spec.deepspeed, 2, use_gpu=True)
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    assert spec.train.max_overflow_steps == 20


def test_the_gpu_check_script_says_there_is_no_cuda_and_fails_on_this_machine(tmp_path):
    """benchmarks/gpu_check.sh is what a session with a GPU runs first; here, without CUDA, it says so in one line
    (also in the summary it leaves in $OUT) and exits non-zero instead of reporting checks it did not run."""
    import subprocess
    import sys

    from conftest import REPO

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script runs its checks (pytest -m gpu covers them)")
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout.startswith("gpu_check: no CUDA: torch ") and "sees no GPU" in out.stdout
    assert (tmp_path / "gpu_check.txt").read_text() == out.stdout
