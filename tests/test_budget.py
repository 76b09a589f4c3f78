"""The time-budget planner (issue 9): it stops on time and the schedule fits the planned steps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import certify.budget as budget_mod
from certify.budget import BudgetPlanner
from certify.cli import cli
from certify.errors import ConfigError
from certify.recipes import RECIPES, apply_recipe, recipe_defaults
from certify.train import TrainConfig, learning_rate, load_train_state, train

TINY = dict(model="lipconvnet5", width=2, dataset="synthetic", synthetic_size=60, batch_size=8,
            power_iters=1, lr=0.05, epochs=50)


class FakeClock:
    """Advances ``tick`` seconds on every reading: each training step reads the clock the same
    number of times, so every step "takes" the same time and the plan is exact."""

    def __init__(self, tick: float = 0.25) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def steps(planner, t, durations):
    for dur in durations:
        planner.step_started()
        t[0] += dur
        planner.step_done()


# ---- the planner alone --------------------------------------------------------------------------

def test_planner_plans_from_measured_steps_and_pause_is_not_counted():
    t = [0.0]
    p = BudgetPlanner(100.0, warmup_steps=1, measure_steps=3, margin=0.0, clock=lambda: t[0])
    p.resume()
    assert p.planned_steps is None and p.total_steps(1000) == 1000
    steps(p, t, (5.0, 1.0, 1.0, 1.0))  # the warm-up step is slow and ignored
    assert p.planned_steps is None  # a step's time is known when the next one starts: 2 measured
    steps(p, t, (1.0,))
    # 9 s used, 91 s left at 1 s per step: 5 done + 91 planned.
    assert p.planned_steps == 96 and p.seconds_per_step == 1.0
    p.pause()
    t[0] += 1000.0  # validation: not training time
    assert p.used_s == 9.0 and not p.out_of_time()
    p.resume()
    t[0] += 91.0
    assert p.out_of_time() and p.finished() and p.remaining_s == 0.0


def test_planner_hard_stop_when_steps_slow_down_and_replan_shrinks_the_plan():
    t = [0.0]
    p = BudgetPlanner(20.0, warmup_steps=0, measure_steps=2, margin=0.0, clock=lambda: t[0])
    p.resume()
    steps(p, t, (1.0, 1.0, 1.0))
    assert p.planned_steps == 3 + 17
    steps(p, t, (3.0, 3.0, 3.0))  # the machine got busy
    p.replan()  # 12 s over 6 steps: 2 s per step, 8 s left -> 4 more
    assert p.planned_steps == 6 + 4 and not p.finished()
    t[0] += 8.0
    assert p.finished()


def test_planner_replans_within_an_epoch_when_the_speed_changes():
    """A run shorter than one epoch (the paper's recipe on a CPU) still follows the measured
    speed: the plan is revised every 5% of the planned steps (at least 20)."""
    t = [0.0]
    p = BudgetPlanner(1000.0, warmup_steps=0, measure_steps=2, margin=0.0, clock=lambda: t[0])
    p.resume()
    steps(p, t, (10.0, 10.0, 10.0))
    assert p.planned_steps == 3 + 97
    steps(p, t, [5.0] * 19)  # faster than measured
    assert p.planned_steps == 100  # 19 steps since the plan: not yet
    p.step_started()
    t[0] += 5.0
    assert p.step_done()  # the 20th step re-plans: 130 s over 23 steps, 870 s left
    assert p.planned_steps == 23 + math.floor(870 / (130 / 23))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_planner_rejects_bad_budgets(bad):
    with pytest.raises(ConfigError, match="budget"):
        BudgetPlanner(bad)
    with pytest.raises(ConfigError, match="budget"):
        TrainConfig(budget_minutes=bad).validate()


# ---- a whole training run ------------------------------------------------------------------------

def test_budgeted_run_stops_on_time_and_the_schedule_ends_at_the_planned_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_mod, "_clock", FakeClock(0.25))
    cfg = TrainConfig(**TINY, schedule="cosine", budget_minutes=0.5, output=str(tmp_path / "run"))
    lrs = []
    import certify.train as train_mod

    real_lr = train_mod.learning_rate
    monkeypatch.setattr(train_mod, "learning_rate", lambda c, i, t: lrs.append((i, t)) or real_lr(c, i, t))
    result = train(cfg, verbose=False)
    state = load_train_state(tmp_path / "run" / "train_state.pt")
    steps_done = int(state["iteration"])
    planned = state["budget"]["planned_steps"]
    # Stopped within the budget (30 s of fake time), on the planned step, far before the epoch cap.
    per_step = state["budget"]["used_s"] / steps_done
    assert state["budget"]["used_s"] <= 30.0 + 2 * per_step  # at most about one step over
    assert steps_done == planned and 10 < planned < 50 * 6
    assert result.epochs_completed == math.ceil(planned / 6) and state["finished"]
    # The schedule was evaluated on the planned total from the first plan on, so it ends near zero.
    totals_after_plan = {t for i, t in lrs[12:]}
    assert max(totals_after_plan) - min(totals_after_plan) <= 0.1 * planned  # re-plans only adjust it
    last_i, last_t = lrs[-1]
    assert last_i == planned - 1 and learning_rate(cfg, last_i, last_t) < 0.01 * cfg.lr
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert rows[-1]["val_clean_acc"] != ""  # the last (possibly partial) epoch is certified
    assert float(rows[-1]["budget_used_s"]) <= 30.0 + 2 * per_step
    # A resume of the finished run does nothing.
    again = train(TrainConfig.from_run_dir(tmp_path / "run", resume=True), verbose=False)
    assert again.epochs_completed == result.epochs_completed


def test_budgeted_run_in_real_time_stops_on_time(tmp_path):
    budget_s = 4.0
    cfg = TrainConfig(**TINY, budget_minutes=budget_s / 60, output=str(tmp_path / "run"))
    train(cfg, verbose=False)
    state = load_train_state(tmp_path / "run" / "train_state.pt")
    per_step = state["budget"]["used_s"] / state["iteration"]
    # The hard stop is checked before every step: at most the step in flight (and the epoch's
    # power iterations) over, with room for a slow step on a loaded machine.
    assert state["budget"]["used_s"] <= budget_s + 5 * per_step + 1.0
    assert state["iteration"] >= 1


# ---- recipes and the CLI -------------------------------------------------------------------------

def test_recipes_fill_only_what_was_not_given():
    merged = apply_recipe("budget", {"width": 4}, {"width": None, "loss": "ce", "epochs": 200})
    assert merged["width"] == 4 and merged["loss"] == "offset" and merged["recipe"] == "budget"
    assert merged["budget_minutes"] == RECIPES["budget"]["budget_minutes"] and merged["epochs"] == 200
    assert recipe_defaults("paper")["schedule"] == "step"
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_defaults("fastest")
    for name in RECIPES:  # every recipe is a valid config
        TrainConfig(**{k: v for k, v in recipe_defaults(name).items()}).validate()


#: the 70-minute row that measured the budget preset (README, "Training on a budget")
BUDGET_ROW = Path(__file__).resolve().parents[1] / "bench/results/2026-12-07-budget-v2final-70min/budget-o2x/config.json"


def test_budget_preset_is_what_its_measured_row_trained():
    """The README's figure for ``--recipe budget`` belongs to these options: every option of the
    preset is the one the committed 70-minute row trained with (its offset resolved as training
    resolves it)."""
    from certify.losses import resolve_offset
    from certify.models import create_model

    row = json.loads(BUDGET_ROW.read_text())
    preset = recipe_defaults("budget")
    assert row["recipe"] == "budget"
    model = create_model(preset["model"], width=preset["width"], head=preset["head"], mean=row["mean"], std=row["std"])
    assert row["offset"] == pytest.approx(resolve_offset(preset.pop("offset", None), model), rel=1e-12)
    assert {k: row[k] for k in preset} == preset


def test_recipe_model_options_are_defaults_key_by_key():
    merged = apply_recipe("budget-bro", {"model_options": {"layer_options": {"rank": 4}}}, {})
    assert merged["model_options"] == {"layers_per_block": 1, "layer_options": {"rank": 4}}
    merged = apply_recipe("budget-bro", {"model_options": {"layers_per_block": 2}}, {})
    assert merged["model_options"] == {"layers_per_block": 2}
    assert RECIPES["budget-bro"]["model_options"] == {"layers_per_block": 1}  # the recipe itself untouched


@pytest.mark.parametrize("recipe, width", [("budget", 2), ("budget-v1", 2), ("budget-bro", 4)])
def test_cli_recipe_budget(tmp_path, recipe, width):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--recipe", recipe, "--budget-minutes", "0.05", "--width", str(width),
                                 "--synthetic-size", "40", "--batch-size", "12", "--power-iters", "1",
                                 "--device", "cpu", "--no-progress", "--channels-last", "--output", str(out)])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["channels_last"] is True
    assert config["recipe"] == recipe and config["width"] == width and config["loss"] == "offset"
    assert config["model"] == RECIPES[recipe]["model"]
    assert config["schedule"] == "cosine" and config["budget_minutes"] == 0.05
    assert "time budget 0.05 min" in r.stderr
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["finished"] and state["budget"]["used_s"] <= 3.0 + 2.0


@pytest.mark.parametrize("args, message", [
    (["--budget-minutes", "0"], "--budget-minutes"),
    (["--recipe", "fastest"], "--recipe"),
    (["--recipe", "budget", "--resume", "--output", "somewhere"], "--recipe applies to a new run"),
])
def test_cli_bad_budget_options(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["train", *args])
    assert r.exit_code == 2 and message in r.output
