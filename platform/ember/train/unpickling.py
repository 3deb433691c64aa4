"""Loading DeepSpeed's checkpoint files without letting them run code.

DeepSpeed writes its checkpoints with `torch.save` (pickles) and reads them with `torch.load(weights_only=False)`, in
its engine (model and optimizer states) and in its universal-checkpoint conversion alike: unpickled whole, a crafted
checkpoint file runs any code it names, on every worker that loads it. `weights_only_loading` makes every
`torch.load` inside it use torch's weights-only unpickler (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`, torch's switch that
overrides a call's own weights_only=False), which builds tensors and plain containers only, plus the few classes of
DeepSpeed's own training state (`DEEPSPEED_STATE`). A file holding anything else fails to load, with an error naming
`trust_checkpoint`: the spec key that loads checkpoints whole, for checkpoints whose writers are trusted.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re

import torch

from ember.errors import EmberError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# The non-container objects DeepSpeed pickles into a checkpoint (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, fp32/bf16/fp16 and universal checkpoints):
# "module:qualified name".
DEEPSPEED_STATE = ("deepspeed.runtime.fp16.loss_scaler:LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
                   "deepspeed.runtime.zero.config:ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment:fragment_address")


def _deepspeed_state_classes() -> list:
    import importlib

    classes = []
    for name in DEEPSPEED_STATE:
        module, qualified = name.split(":")
        classes.append(getattr(importlib.import_module(module), qualified))
    return classes


@contextlib.contextmanager
def weights_only_loading(checkpoint: str, trusted: bool = False):
    """Every `torch.load` in the block loads tensors, containers and DeepSpeed's state classes only; a file with
    anything else raises an EmberError naming `checkpoint` and what it held. `trusted` (the spec's
    trust_checkpoint): loads are left as DeepSpeed makes them."""
    if trusted:
        yield
        return
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            yield
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise EmberError(f"checkpoint {checkpoint} holds objects other than tensors and DeepSpeed's training state "
                         f"({found.group(1) if found else 'see --debug'}): unpickling them could run code, so it was "
                         "not loaded. Set trust_checkpoint: true only for a checkpoint whose writers you trust"
                         ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous
