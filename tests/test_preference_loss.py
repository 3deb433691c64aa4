"""Ember's preference losses (`ember.train.preference_loss`) against TRL's own trainers, on one tiny random Llama.

The reference is TRL's real code (the version the module docstring names), run on trainer instances built on the
same model (transformers' LlamaForCausalLM; with LoRA, PEFT's adapters set to Ember's values) with a
`datasets.Dataset` of text pairs that the trainer tokenizes into the token ids Ember's rows hold, and collated by
the trainer's own collator:
- dpo, ipo: `DPOTrainer.compute_loss` (its `_compute_loss`: the policy forward through TRL's fused LM head, the
  reference forward — an explicit `ref_model`, or with LoRA the PEFT model with its adapters disabled by TRL's
  `use_adapter` —, the loss, and the metrics it stores in `_metrics`);
- simpo: `CPOTrainer.get_batch_loss_metrics` (`concatenated_forward`, `get_batch_logps`, `cpo_loss`), cpo_alpha 0;
- orpo: `ORPOTrainer.get_batch_loss_metrics` (`concatenated_forward` with its NLL, `get_batch_logps`,
  `odds_ratio_loss`), TRL's `beta` being Ember's λ;
- dpo with label smoothing: `CPOTrainer.cpo_loss` ("sigmoid") fed the log-ratios, since TRL's DPOTrainer reads
  `label_smoothing` only for its robust and EXO losses.
Losses and every metric Ember reports agree within 1e-5, gradients parameter by parameter within 1e-4 (Ember's
fused qkv_proj / gate_up_proj split back into Llama's rows; with LoRA, each adapter's A and B against PEFT's).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from ember.config.specs import LoraSpec, PreferenceLossSpec
from ember.model import Transformer, load_model
from ember.model.hf_format import to_hf_state
from ember.train.lora import LoraLinear, adapters_disabled, apply_lora
from ember.train.preference_loss import pair_logps, preference_loss
from test_model import ember_config, hf_config

PAD, EOS = 0, 1
# (prompt, chosen, rejected) token ids: unequal lengths on both sides, answers ending with EOS as the pair tokenizer
# writes them (TRL's CPO and ORPO trainers would append one otherwise).
PAIRS = [([5, 6, 7, 8], [9, 10, 11, EOS], [12, EOS]),
         ([13, 14], [15, EOS], [16, 17, 18, 19, 20, EOS]),
         ([21, 22, 23], [24, 25, EOS], [26, 27, EOS])]
# Ember's spec and the same settings in TRL's config, per loss.
SETTINGS = {
    "dpo": (PreferenceLossSpec(loss="dpo", beta=0.2), dict(beta=0.2, loss_type=["sigmoid"])),
    "ipo": (PreferenceLossSpec(loss="ipo", beta=0.3), dict(beta=0.3, loss_type=["ipo"])),
    "simpo": (PreferenceLossSpec(loss="simpo", beta=2.0, gamma=0.7, label_smoothing=0.1),
              dict(beta=2.0, simpo_gamma=0.7, label_smoothing=0.1, loss_type="simpo", cpo_alpha=0.0)),
    "orpo": (PreferenceLossSpec(loss="orpo", **{"lambda": 0.25}), dict(beta=0.25)),  # TRL's beta is λ
}
METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"}
LORA = LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer for which the text "w5 w6 <eos>" is the ids [5, 6, 1] (no BOS, nothing added)."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def text(ids: list[int]) -> str:
    return "".join(" <eos>" if i == EOS else f" w{i}" for i in ids)


def ember_batch(pairs=PAIRS, extra_padding: int = 2) -> dict[str, torch.Tensor]:
    """Ember's pair rows (B, T + 1): prompt, answer, right padding (wider than TRL's, which must not matter)."""
    width = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) + extra_padding
    batch = {}
    for side, (ids_key, mask_key) in ((1, ("input_ids", "loss_mask")), (2, ("rejected_ids", "rejected_mask"))):
        ids = torch.full((len(pairs), width), PAD)
        mask = torch.zeros(len(pairs), width, dtype=torch.long)
        for row, pair in enumerate(pairs):
            prompt, answer = pair[0], pair[side]
            ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            mask[row, len(prompt):len(prompt) + len(answer)] = 1
        batch[ids_key], batch[mask_key] = ids, mask
    return batch


def with_adapters_off(model):
    """The LoRA model called with its adapters off (`adapters_disabled`, as the recipe does): Ember's reference for
    dpo and ipo with LoRA, against TRL's PEFT model with its adapters disabled."""
    def forward(ids):
        with adapters_disabled(model):
            return model(ids)
    return forward


def ember_adapters(model) -> dict[str, torch.nn.Parameter]:
    """Ember's adapter parameters under the names PEFT's LoraModel gives its own (adapter "default")."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear):
            parent = path.rsplit(".", 1)[0]  # layers.N.self_attn
            for name in module.lora_A:
                prefix = f"base_model.model.model.{parent}.{name}"
                out[f"{prefix}.lora_A.default.weight"] = module.lora_A[name]
                out[f"{prefix}.lora_B.default.weight"] = module.lora_B[name]
    return out


def trl_trainer(loss: str, model, ref_model, peft_config, out, **overrides) -> DPOTrainer | CPOTrainer | ORPOTrainer:
    """TRL's trainer for `loss` on a Dataset of the PAIRS as text (TRL's default bf16 autocast off: fp32 both ways)."""
    settings = dict(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, **SETTINGS[loss][1])
    settings.update(overrides)
    data = Dataset.from_list([{"prompt": text(p).strip(), "chosen": text(c), "rejected": text(r)} for p, c, r in PAIRS])
    if loss in ("dpo", "ipo"):
        return DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**settings), train_dataset=data,
                          processing_class=tokenizer(), peft_config=peft_config)
    trainer, config = (CPOTrainer, CPOConfig) if loss == "simpo" else (ORPOTrainer, ORPOConfig)
    return trainer(model=model, args=config(max_length=64, **settings), train_dataset=data,
                   processing_class=tokenizer(), peft_config=peft_config)


def trl_step(trainer, loss: str, ours: dict) -> tuple[float, dict[str, float]]:
    """TRL's loss (backpropagated) and metrics on the PAIRS, collated by the trainer's collator."""
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    chosen_ids = batch["input_ids"][:len(PAIRS)] if loss in ("dpo", "ipo") else batch["chosen_input_ids"]
    assert torch.equal(chosen_ids, ours["input_ids"][:, :chosen_ids.shape[1]])  # the same tokens both ways
    if loss in ("dpo", "ipo"):
        value = trainer.compute_loss(trainer.model, batch)
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    else:
        value, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    value.backward()
    return value.item(), metrics


def ember_step(cfg: PreferenceLossSpec, model, reference, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Ember's loss (backpropagated) and metrics; `reference` runs the reference model (None: reference-free)."""
    logps = pair_logps(model, batch)
    with torch.no_grad():
        ref = pair_logps(reference, batch) if cfg.needs_reference else None
    value, metrics = preference_loss(cfg, logps, ref)
    value.backward()
    return value.item(), metrics


def full_models(tmp_path):
    """(Ember policy, Ember reference, HF policy, HF reference): the policy is the reference plus noise."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(hf_config(ember_config("llama3-rope")))
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base.save_pretrained(tmp_path / "policy")
    return (load_model(tmp_path / "policy"), load_model(tmp_path / "base"),
            LlamaForCausalLM.from_pretrained(tmp_path / "policy"), LlamaForCausalLM.from_pretrained(tmp_path / "base"))


def lora_model(tmp_path):
    """(Ember base with adapters whose B is non-zero, HF base): PEFT is applied by TRL's trainer."""
    torch.manual_seed(0)
    LlamaForCausalLM(hf_config(ember_config("llama3-rope"))).save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    with torch.no_grad():
        for p in apply_lora(ours, LORA):
            p.normal_(std=0.1)
    return ours, LlamaForCausalLM.from_pretrained(tmp_path / "base")


def assert_same_gradients(ours, theirs, lora: bool):
    if lora:
        named = dict(theirs.named_parameters())
        pairs = {name: (p.grad, named[name].grad) for name, p in ember_adapters(ours).items()}
        assert len(pairs) == 2 * LORA_BLOCKS
    else:
        grads = to_hf_state({name: p.grad for name, p in ours.named_parameters()}, ours.config)
        named = dict(theirs.named_parameters())
        assert grads.keys() == named.keys()
        pairs = {name: (grad, named[name].grad) for name, grad in grads.items()}
    assert any(mine.abs().max() > 1e-3 for mine, _ in pairs.values())  # a gradient worth comparing
    for name, (mine, reference) in pairs.items():
        assert torch.allclose(mine, reference, atol=1e-4, rtol=0), name


LORA_BLOCKS = len(LORA.target_modules) * ember_config("llama3-rope").num_hidden_layers


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss", sorted(SETTINGS))
def test_loss_metrics_and_gradients_equal_trls(tmp_path, loss, lora):
    cfg = SETTINGS[loss][0]
    batch = ember_batch()
    if lora:
        ours, hf = lora_model(tmp_path)
        trainer = trl_trainer(loss, hf, None, LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                                        target_modules=list(LORA.target_modules)), tmp_path / "trl")
        named = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for name, p in ember_adapters(ours).items():
                named[name].copy_(p)
        reference = with_adapters_off(ours)
    else:
        ours, ember_ref, hf, hf_ref = full_models(tmp_path)
        trainer = trl_trainer(loss, hf, hf_ref, None, tmp_path / "trl")
        reference = ember_ref
    expected_loss, expected = trl_step(trainer, loss, batch)
    got_loss, got = ember_step(cfg, ours, reference, batch)
    assert set(got) == METRICS | ({"nll_loss", "log_odds_ratio", "log_odds_chosen"} if loss == "orpo" else set())
    assert abs(got_loss - expected_loss) <= 1e-5
    for name, value in got.items():
        assert abs(value.item() - expected[name]) <= 1e-5, name
    assert got["rewards/chosen"].abs() > 1e-4  # the policy is not its reference
    assert_same_gradients(ours, trainer.model, lora)



def random_logps(pairs: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 9, (2, pairs), generator=g).float()
    sums = -tokens * (1 + 3 * torch.rand(2, pairs, generator=g))
    return {"chosen_logps": sums[0], "rejected_logps": sums[1], "chosen_tokens": tokens[0],
            "rejected_tokens": tokens[1], "chosen_nll": sums[0].sum() / tokens[0].sum()}


def test_dpo_label_smoothing_is_the_conservative_loss_trl_computes_on_the_log_ratios(tmp_path):
    cfg = PreferenceLossSpec(loss="dpo", beta=0.2, label_smoothing=0.2)
    policy, reference = random_logps(seed=3), random_logps(seed=4)
    # CPOTrainer's "sigmoid" loss is conservative DPO's when fed the log-ratios against the reference.
    trainer = trl_trainer("simpo", LlamaForCausalLM(hf_config(ember_config("llama3-rope"))), None, None,
                          tmp_path / "trl", loss_type="sigmoid", beta=0.2, label_smoothing=0.2)
    losses, _, _ = trainer.cpo_loss(policy["chosen_logps"] - reference["chosen_logps"],
                                    policy["rejected_logps"] - reference["rejected_logps"])
    smoothed, _ = preference_loss(cfg, policy, reference)
    assert abs(smoothed.item() - losses.mean().item()) <= 1e-6
    plain, _ = preference_loss(cfg.model_copy(update={"label_smoothing": 0.0}), policy, reference)
    assert abs(smoothed.item() - plain.item()) > 1e-3


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_a_reference_loss_without_reference_log_probabilities_is_refused(loss):
    with pytest.raises(ValueError, match=f"the {loss} loss compares the policy with a reference model"):
        preference_loss(SETTINGS[loss][0], random_logps(), None)


@pytest.mark.parametrize("loss", sorted(SETTINGS))
def test_a_side_without_answer_tokens_gives_a_finite_loss_and_gradients(loss):
    """TRL's simpo and orpo average an empty side as 0/0 = NaN (its dpo sums to 0, its ipo divides by at least 1);
    Ember divides by at least 1 everywhere, and orpo's log(1 - p) of such a side stays finite."""
    torch.manual_seed(5)
    model, reference = Transformer(ember_config("llama3-rope")), Transformer(ember_config("llama3-rope"))
    pairs = [(PAIRS[0][0], PAIRS[0][1], []), (PAIRS[1][0], [], PAIRS[1][2]), PAIRS[2]]
    batch = ember_batch(pairs)
    cfg = SETTINGS[loss][0]
    logps = pair_logps(model, batch)
    assert logps["rejected_tokens"].tolist() == [0, 6, 3] and logps["chosen_tokens"].tolist() == [4, 0, 3]
    with torch.no_grad():
        ref = pair_logps(reference, batch) if cfg.needs_reference else None
    value, metrics = preference_loss(cfg, logps, ref)
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(m) for m in metrics.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if loss in ("simpo", "orpo"):  # what TRL computes for the same empty row
        trainer = CPOTrainer if loss == "simpo" else ORPOTrainer
        empty = trainer.get_batch_logps(torch.randn(1, 5, 97), torch.full((1, 5), -100), average_log_prob=True)
        assert torch.isnan(empty).all()
