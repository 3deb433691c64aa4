"""The training plane's components without Ray or a training run: the run's data module loads no training stack,
both recipes implement the declared `Recipe` fully, and the one evaluation loop scores batches by the recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_the_run_plan_and_reports_load_neither_torch_nor_ray():
    code = ("import sys, ember.train.run, ember.runs.report, ember.runs.progress; "
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "platform")}).stdout
    assert out.strip() == "[]"


def test_every_recipe_implements_the_whole_recipe_protocol():
    from ember.config.specs import PreferenceLossSpec
    from ember.train.recipes import RECIPES, PreferenceTuning, Recipe

    wanted = {name for name in vars(Recipe) if not name.startswith("_")}
    assert {"build", "skeleton", "loss", "evaluation_loss", "exports_from_state", "before_export"} <= wanted
    recipes = {**RECIPES, "preference": PreferenceTuning(PreferenceLossSpec(), "lora")}
    for kind, recipe in recipes.items():
        assert isinstance(recipe, Recipe), kind
        # each method the recipe's own (or a recipe's it extends), none the Protocol's empty body
        assert all(getattr(type(recipe), name) is not getattr(Recipe, name) for name in wanted), kind
        assert recipe.rows_per_sample in (1, 2) and isinstance(recipe.has_perplexity, bool), kind


@torch.no_grad()
def test_the_evaluation_loop_scores_each_batch_by_its_recipe_with_its_target_count():
    from ember.train.recipes import RECIPES, evaluation_losses, next_token_loss, supervised_loss

    model = tiny_model(50)
    rows = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    losses, targets = evaluation_losses(RECIPES["pretrain"], model, [rows[:2], rows[2:]])
    assert targets.tolist() == [16, 16]
    assert losses.tolist() == pytest.approx([float(next_token_loss(model, rows[:2])),
                                             float(next_token_loss(model, rows[2:]))])
    mask = torch.zeros_like(rows)
    mask[:, 5:] = 1
    batch = {"input_ids": rows, "loss_mask": mask, "segments": torch.ones_like(rows)}
    losses, targets = evaluation_losses(RECIPES["finetune"], model.train(), [batch])
    assert targets.tolist() == [16] and model.training  # the mode it had is given back
    assert float(losses[0]) == pytest.approx(float(supervised_loss(model.eval(), batch)))


def test_the_learning_rate_warms_up_then_decays_to_its_floor():
    from ember.config.specs import TrainSpec
    from ember.train.optim import lr_at

    train = TrainSpec(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(5, train, 100) == pytest.approx(5e-4)
    assert lr_at(10, train, 100) == pytest.approx(1e-3)
    assert lr_at(100, train, 100) == pytest.approx(1e-4)
    assert 1e-4 < lr_at(55, train, 100) < 1e-3


def test_a_preference_dataset_has_no_dataset_loss_and_says_what_scores_it():
    from ember.errors import EmberError
    from ember.train.recipes import dataset_recipe

    with pytest.raises(EmberError, match="runs/x/data holds preference pairs.*data.pairs"):
        dataset_recipe({"kind": "preference"}, "runs/x/data")
