"""Named training recipes: sets of :class:`certify.train.TrainConfig` defaults.

- ``paper``: the recipe of Singla & Feizi (NeurIPS 2022; paper.md 7) for LipConvnet-5: width 32,
  SOC with 6 Taylor terms and the fast backward, MaxMin, max pooling, orthogonal head, SGD lr 0.1,
  momentum 0.9, weight decay 5e-4, crop + flip, batch 128, lr x0.1 at 50% and 75% of the steps,
  cross-entropy. This is also what ``lipcert train`` does with no recipe.
- ``budget``: aimed at certified accuracy per CPU minute, chosen from throughput measurements and
  an ablation, not a sweep (issue 9, bench/budget_recipe.py): a narrow LipConvnet-5 trained with
  the offset cross-entropy (the margin that certifies 36/255) and a cosine schedule fitted to a
  wall-clock budget (default 70 minutes; see :mod:`certify.budget`). The schedule logic is
  budget-based, so the same preset uses a GPU's speed for more epochs, not a different recipe.

A recipe only fills in options that were not given: ``--recipe budget --width 16`` trains width 16.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(model="lipconvnet5", width=32, activation="maxmin", pooling="max", head="ortho",
                  train_terms=6, backward="fast", batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                  schedule="step", loss="ce", augment=True),
    "budget": dict(model="lipconvnet5", width=8, activation="maxmin", pooling="max", head="lln",
                   train_terms=6, backward="fast", batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                   schedule="cosine", loss="offset", augment=True, budget_minutes=70.0, eval_every=5),
}


def recipe_defaults(name: str) -> dict[str, Any]:
    """The option values of recipe ``name`` (a copy)."""
    try:
        return dict(RECIPES[name])
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


def apply_recipe(name: str | None, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Options for a run: ``given`` (set by the user) over recipe ``name`` over ``defaults``."""
    merged = dict(defaults)
    if name is not None:
        merged.update(recipe_defaults(name))
        merged["recipe"] = name
    merged.update(given)
    return merged
