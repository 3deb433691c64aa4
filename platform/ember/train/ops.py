"""The DeepSpeed ops Ember's runs load, built ahead of time: no run compiles code at its first step.

    python -m ember.train.ops        # `make install`, cluster/Dockerfile, cluster/aws.yaml's setup_commands

Without optimizer offload a run's optimizer is torch's AdamW (fused on GPUs: compiled into torch), so it loads no op
at all. The ops built here are the ones a run may load: DeepSpeed's CPU Adam (`deepspeed.offload_optimizer`) and, on
CPU, DeepSpeed's shared-memory collectives. They are JIT-built into torch's extension cache
(`~/.cache/torch_extensions`) by the same builders, with the same ninja (ember.runtime.use_environment_ninja), that a
run uses, so the run finds them built. For a CUDA build of torch the ops are built for CUDA (also on a machine with
no GPU, such as `docker build`: `DS_ACCELERATOR=cuda`), with a CUDA toolkit whose major version is torch's: a
toolkit of another major version would build ops that fail to load, so that is refused here, at build time.
"""

from __future__ import annotations

import os
import sys

from ember.errors import EmberError

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def check_cuda_toolkit(torch_cuda: str, nvcc: tuple[int, int] | None, cuda_home: str | None) -> None:
    """Refuses a CUDA toolkit that cannot build ops for this torch: none, or another major version."""
    if nvcc is None:
        raise EmberError(f"torch is built for CUDA {torch_cuda} but no CUDA toolkit (nvcc) was found"
                         f"{f' in CUDA_HOME={cuda_home}' if cuda_home else ''}; install CUDA {torch_cuda.split('.')[0]}"
                         ".x's toolkit, or set CUDA_HOME to it")
    if str(nvcc[0]) != torch_cuda.split(".")[0]:
        raise EmberError(f"torch is built for CUDA {torch_cuda} but nvcc in {cuda_home} is CUDA {nvcc[0]}.{nvcc[1]}: "
                         f"ops built with it would not load; set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x "
                         "toolkit")


def prebuild() -> list[str]:
    """Builds (or finds built) every op of OPS the accelerator has; returns their names."""
    from ember.runtime import use_environment_ninja

    use_environment_ninja()
    import torch
    import torch.utils.cpp_extension
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if torch.version.cuda and accelerator.device_name() == "cuda":
        from deepspeed.ops.op_builder.builder import MissingCUDAException, installed_cuda_version

        try:
            nvcc = installed_cuda_version()
        except MissingCUDAException:
            nvcc = None
        check_cuda_toolkit(torch.version.cuda, nvcc, torch.utils.cpp_extension.CUDA_HOME)
    built = []
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        builder.load(verbose=False)
        built.append(builder.name)
    return built


def main() -> int:
    try:
        built = prebuild()
    except EmberError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from deepspeed.accelerator import get_accelerator

    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions"
    print(f"DeepSpeed ops built for {get_accelerator().device_name()}: {', '.join(built) or 'none'} (in {cache})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
