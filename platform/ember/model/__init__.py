"""The model plane: the Llama-architecture Transformer with its families as data (`llama`), the KV cache, sampling
and the one decode loop and detokenizer (`sampling`, `generate`), HF-format model dirs (`hf` finds and reads one and
owns a model's generation stops, `hf_format` writes one), GGUF import (`gguf`) and the built-in model (`builtin`).

Imports neither Ray nor DeepSpeed.
"""

from ember.model.generate import Completion, TextStream, decode_steps, generate_ids
from ember.model.hf import generation_stops, load_model
from ember.model.hf_format import save_model, save_weights
from ember.model.llama import (
           PRESETS,
           KVCache,
           ModelConfig,
           Transformer,
           build_model,
           flops_per_token,
           fused_slices,
           num_parameters,
           preset,
           resize_vocab,
)
from ember.model.sampling import SamplingParams

__all__ = ["PRESETS", "Completion", "KVCache", "ModelConfig", "SamplingParams", "TextStream", "Transformer",
           "build_model", "decode_steps", "flops_per_token", "fused_slices", "generate_ids", "generation_stops",
           "load_model", "num_parameters", "preset", "resize_vocab", "save_model", "save_weights"]
