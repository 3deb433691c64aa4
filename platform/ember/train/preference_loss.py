"""The preference losses of `kind: preference` in plain PyTorch: the log-probabilities of a batch of pairs under a
model (`pair_logps`), and the loss with the metrics TRL logs, under TRL's names (`preference_loss`).

The definitions are TRL's (version 1.16.0), term by term, so that Ember's figures read like TRL's:
- dpo: `DPOTrainer`, loss_type "sigmoid": -log σ(β·Δ), Δ = (chosen - ref chosen) - (rejected - ref rejected) on the
  log-probabilities summed over the answer tokens.
- ipo: `DPOTrainer`, loss_type "ipo": (Δ' - 1/(2β))², Δ' the same log-ratios each divided by its side's number of
  answer tokens.
- simpo: `CPOTrainer`, loss_type "simpo" with cpo_alpha 0: -log σ(β·(c - r - γ/β)), c and r the policy's
  log-probabilities averaged over the answer tokens; no reference.
- orpo: `ORPOTrainer`: NLL of the chosen rows - λ·log σ(log-odds(c) - log-odds(r)), with c and r averaged, and the
  NLL over the chosen rows' prompt and answer tokens alike, as TRL's `concatenated_forward` takes it. TRL's
  ORPOConfig calls λ `beta`; Ember's λ is `PreferenceLossSpec.odds_weight`.

Rewards (the metrics' `rewards/*`) are TRL's: β·(policy - reference) summed log-probabilities for dpo and ipo, β·the
averaged policy log-probabilities for simpo; for orpo TRL scales them by its `beta`, which is λ, and so does Ember
(λ, not `beta`). `logps/*` are the summed log-probabilities for dpo and ipo, the averaged ones for simpo and orpo.

Label smoothing ε: simpo's is TRL's (conservative form, -(1-ε)·log σ(x) - ε·log σ(-x)). TRL 1.16's DPOTrainer
ignores `label_smoothing` for "sigmoid" (it reads it only for "robust" and "exo_pair"); Ember's dpo applies the same
conservative form (conservative DPO, as TRL's "sigmoid" did before, and as CPOTrainer's "sigmoid" still does).

A side with no answer tokens (which the pair tokenizer never emits, but a hostile batch may hold): dpo and ipo are
TRL's (a sum of 0; ipo divides by at least 1 token). TRL's simpo and orpo give NaN there (0/0); Ember divides by at
least 1 token, so the side's average is 0, and orpo's log(1 - p) stops at the smallest float instead of log 0: the
loss and its gradients stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ember.config.specs import PreferenceLossSpec

# TRL's log1mexp branch point (-ln 2): below it log1p(-exp x) is exact, above it log(-expm1 x).
_LOG_HALF = -math.log(2)


def pair_logps(model, batch: dict) -> dict[str, torch.Tensor]:
    """Log-probabilities of both sides of a batch of pairs, in one forward over the 2B rows.

    `batch` holds `input_ids` and `loss_mask` (the chosen rows, (B, T + 1): prompt, answer, right padding; the mask
    is 1 on the answer tokens) and `rejected_ids`, `rejected_mask` alike. `model` is called as `model(ids)` only, so
    it may be a DeepSpeed engine around the Transformer. Returns, per pair (B,): `chosen_logps`, `rejected_logps`
    (sums over the answer targets), `chosen_tokens`, `rejected_tokens` (how many); and `chosen_nll`, the mean NLL
    over every target of the chosen rows up to their last answer token (ORPO's, prompt included as TRL has it).
    """
    b = batch["input_ids"].shape[0]
    ids = torch.cat([batch["input_ids"], batch["rejected_ids"]])  # (2B, T + 1)
    logits = model(ids[:, :-1])  # (2B, T, V)
    targets = ids[:, 1:]
    # log_softmax gathered at the targets without a second (2B, T, V) tensor: logit - logsumexp.
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (2B, T)
    token_logps = token_logps.float()  # sums of ~100 tokens in bf16 would keep no decimals: margins would read 0
    answer = torch.cat([batch["loss_mask"], batch["rejected_mask"]])[:, 1:].to(token_logps.dtype)
    sums, counts = (token_logps * answer).sum(-1), answer.sum(-1)
    seen = _through_last_answer(batch["loss_mask"])[:, 1:].to(token_logps.dtype)  # (B, T)
    nll = -(token_logps[:b] * seen).sum() / seen.sum().clamp(min=1)
    return {"chosen_logps": sums[:b], "rejected_logps": sums[b:], "chosen_tokens": counts[:b],
            "rejected_tokens": counts[b:], "chosen_nll": nll}


def _through_last_answer(mask: torch.Tensor) -> torch.Tensor:
    """(B, T + 1) bool: the positions up to each row's last answer token (its prompt and answer, not its padding)."""
    return mask.flip(-1).cumsum(-1).flip(-1) > 0


def preference_loss(cfg: PreferenceLossSpec, logps: dict, reference: dict | None) -> tuple[torch.Tensor,
                                                                                            dict[str, torch.Tensor]]:
    """The batch's mean loss and TRL's metrics (scalar tensors, batch means, detached) for `pair_logps`'s output.

    `reference` holds the reference model's `chosen_logps` and `rejected_logps` (sums, (B,)) for dpo and ipo, and is
    None for the reference-free simpo and orpo (ignored there).
    """
    if cfg.needs_reference and reference is None:
        raise ValueError(f"the {cfg.loss} loss compares the policy with a reference model, but no reference "
                         "log-probabilities were given (pass the reference's chosen_logps and rejected_logps)")
    if cfg.loss in ("dpo", "ipo"):
        return _reference_loss(cfg, logps, reference)
    if cfg.loss == "simpo":
        return _simpo_loss(cfg, logps)
    if cfg.loss == "orpo":
        return _orpo_loss(cfg, logps)
    raise ValueError(f"unknown preference loss {cfg.loss!r}")


def _reference_loss(cfg: PreferenceLossSpec, logps: dict, reference: dict):
    """dpo and ipo: DPOTrainer's "sigmoid" and "ipo" on the log-ratios against the reference."""
    chosen = logps["chosen_logps"] - reference["chosen_logps"].to(logps["chosen_logps"]).detach()
    rejected = logps["rejected_logps"] - reference["rejected_logps"].to(logps["rejected_logps"]).detach()
    if cfg.loss == "dpo":
        losses = _smoothed_sigmoid_loss(cfg.beta * (chosen - rejected), cfg.label_smoothing)
    else:  # IPO: TRL divides by the answer lengths, as the IPO authors' results do
        delta = chosen / logps["chosen_tokens"].clamp(min=1) - rejected / logps["rejected_tokens"].clamp(min=1)
        losses = (delta - 1 / (2 * cfg.beta)) ** 2
    return losses.mean(), _metrics(cfg.beta * chosen, cfg.beta * rejected, logps["chosen_logps"],
                                   logps["rejected_logps"])


def _simpo_loss(cfg: PreferenceLossSpec, logps: dict):
    """SimPO: CPOTrainer's "simpo" (cpo_alpha 0) on the averaged log-probabilities, margin γ."""
    chosen, rejected = _averages(logps)
    logits = (chosen - rejected) - cfg.margin / cfg.beta
    losses = _smoothed_sigmoid_loss(cfg.beta * logits, cfg.label_smoothing)
    return losses.mean(), _metrics(cfg.beta * chosen, cfg.beta * rejected, chosen, rejected)


def _orpo_loss(cfg: PreferenceLossSpec, logps: dict):
    """ORPO: ORPOTrainer's chosen NLL - λ·log σ(log odds ratio) on the averaged log-probabilities."""
    chosen, rejected = (side.float() for side in _averages(logps))
    weight = cfg.odds_weight  # TRL's ORPOConfig.beta
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = logps["chosen_nll"]
    loss = nll - (weight * ratio).mean()
    metrics = _metrics(weight * chosen, weight * rejected, chosen, rejected)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.mean().detach(),
                    "log_odds_chosen": log_odds.mean().detach()})
    return loss, metrics


def _averages(logps: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each side's log-probability per answer token (an empty side: 0, where TRL divides 0 by 0)."""
    return (logps["chosen_logps"] / logps["chosen_tokens"].clamp(min=1),
            logps["rejected_logps"] / logps["rejected_tokens"].clamp(min=1))


def _smoothed_sigmoid_loss(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log σ(x), with a share ε of labels taken as flipped: -(1-ε)·log σ(x) - ε·log σ(-x)."""
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x ≤ 0, TRL's two branches; each branch is fed only inputs it is finite on (so the one not
    taken adds no NaN to the gradient), and x = 0 (log 0) gives log of the smallest float."""
    below = torch.log1p(-torch.exp(x.clamp(max=_LOG_HALF)))
    above = torch.log((-torch.expm1(x.clamp(min=_LOG_HALF))).clamp(min=torch.finfo(x.dtype).tiny))
    return torch.where(x < _LOG_HALF, below, above)


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """TRL's reward and log-probability metrics, batch means."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}
