"""LoRA on Ember's fused projections against PEFT on `transformers`' LlamaForCausalLM, without Ray or training: the
adapters Ember saves are PEFT's adapters of the Llama modules they name, and merging them changes nothing."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from ember.config.specs import LoraSpec
from ember.model import load_model, save_model
from ember.train.lora import adapter_state, apply_lora, merge_lora, save_adapter
from test_model import ember_config, hf_config, tokens


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["k_proj", "o_proj", "gate_proj", "up_proj"]])
def test_ember_adapters_load_in_peft_with_equal_logits_and_merge_to_the_same_model(tmp_path, targets):
    torch.manual_seed(4)
    cfg = ember_config("gqa-tied")
    LlamaForCausalLM(hf_config(cfg)).save_pretrained(tmp_path / "base")
    spec = LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=targets)
    ours = load_model(tmp_path / "base")
    trainable = apply_lora(ours, spec)
    with torch.no_grad():
        for p in trainable:  # B starts at 0 (the adapter adds nothing yet): give every block an update to compare
            p.normal_(std=0.05)
    state = adapter_state(ours)
    assert {k.split(".")[-3] for k in state} == set(targets)
    save_adapter(state, spec, str(tmp_path / "base"), tmp_path / "adapter")
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    x = tokens(seed=5)
    with torch.no_grad():
        adapted = ours.eval()(x)
        assert torch.allclose(peft(x).logits, adapted, atol=1e-4, rtol=0)
        merged = merge_lora(ours)
        assert torch.allclose(merged(x), adapted, atol=1e-4, rtol=0)
    save_model(merged, tmp_path / "merged")
    hf_merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = peft.merge_and_unload().state_dict()
    for name, tensor in hf_merged.state_dict().items():
        assert torch.allclose(tensor, reference[name], atol=1e-6), name
