"""Named training recipes: sets of :class:`certify.train.TrainConfig` defaults.

- ``paper``: the recipe of Singla & Feizi (NeurIPS 2022; paper.md 7) for LipConvnet-5: width 32,
  SOC with 6 Taylor terms and the fast backward, MaxMin, max pooling, orthogonal head, SGD lr 0.1,
  momentum 0.9, weight decay 5e-4, crop + flip, batch 128, lr x0.1 at 50% and 75% of the steps,
  cross-entropy. This is also what ``lipcert train`` does with no recipe.
- ``budget`` (v2, issue 17): the best certified accuracy at 36/255 measured after 70 minutes of
  training on one CPU core (bench/budget_recipe.py; bench/results/2026-12-07-budget-*): the compact
  LipConvnet ``lipconvnet8c`` at width 8 (blocks of 1, 2, 2, 2, 1 SOC layers, each stride 2 an
  orthogonal 2x2 convolution, LLN head), SOC polynomials of the fewest terms for each layer's
  sound norm bound (``train_terms="auto"``), NHWC convolutions, offset cross-entropy with twice the
  certifying margin (``offset="2x"``, as the CVPR'24 comparison trains), and otherwise v1's
  training: SGD lr 0.1, cosine fitted to the budget (default 70 minutes; see
  :mod:`certify.budget`), batch 128, crop + flip. Chosen from 15-minute screens and 70-minute rows,
  not a sweep: 54.16% at 36/255 (68.24% clean) after 70 minutes on an AMD EPYC core, 53.52% with
  the default offset (bench/results/2026-12-07-budget-v2final-70min).
- ``budget-v1``: the preset until issue 17 (issue 9): a narrow LipConvnet-5 (SOC, width 8) with the
  paper's 6-term series and the default offset, otherwise the same training; 51.96% at 36/255
  after 70 minutes on the same CPU (bench/results/2026-12-07-budget-epyc-70min).
- ``budget-bro`` (issue 17): the CVPR'24 comparison's ConvNet-XS with ONE BRO convolution per block
  (136k parameters), LLN head, offset cross-entropy, SGD lr 0.05, cosine fitted to the budget,
  batch 128, crop + flip: the best layer of bench/layers_compared.py at 15 minutes (37.7% at
  36/255 where SOC, AOL, CPL reached 29.5-30.9% and ``budget-v1`` 30.6% on the same CPU); at 70
  minutes it certifies 44.4% (bench/results/2026-12-02-layers-compared-xs1-70min), below the
  49.8% ``budget-v1`` reached in 70 minutes on the same CPU (2026-12-02-budget-recipe-v1-70min),
  so it is not the default.
- ``bronet-cifar``: for GPUs, BRONet-L (+LA) of Lai, Huang, Kung & Chen (ICML 2025) as its public
  configuration trains it (ntuaislab/BRONet, bronet/configs/benchmark_reproduce/cifar10.yaml;
  cifar100.yaml is the same but for the dataset): depth 12, width 512, MaxMin, LLN head, a BRO
  backbone of rank ratio 0.5, CHORD dense layers of width 2048 (the neck's and 8 more); batch 256,
  800 epochs, NAdam lr 1e-3 with 20 linear warmup epochs then cosine, weight decay 4e-5 on every
  parameter, gradient norm clipped at 3, Lookahead (k 6, alpha 0.5, synced after each epoch, as
  timm's defaults in their trainer); their logit annealing on EMMA's lifted logits (``emma_la``):
  eps 36/255 ramped from 0.1x to 3x over the first half of training, alpha 1, beta 5 (their gamma),
  offset 2.0, temperature 0.75. Pick the dataset: ``--dataset cifar10`` or ``cifar100``.
  Where lipcert differs: the stem is a SOC 3x3 convolution on the space-to-depth input (theirs a
  5x5 stride-2 plain convolution whose norm, power-iterated, scales their margins; so their
  logit scale is learned, lipcert's is fixed at 1/std, 3.99 on CIFAR-10, and the offset 2.0
  is then the margin of radius 2.0 / (sqrt(2) 3.99) = 90/255); the neck is two 1x1 stride-2 SOC layers (theirs one
  CHORD 4x4 stride-4 convolution); the backbone's V is trained directly from their initial value
  (theirs through V = I + depth^-1/2 gamma W; see :mod:`certify.models.liresnet`), without their
  centring; the CHORD dense layers start orthogonal (theirs near the identity); their
  RandAugment (applied to half the images) and EDM-generated data (their Table 2, not this
  configuration) are not implemented; their slow weights start as timm's (the fast weights after k
  steps), lipcert's at the initial weights; the cosine goes to 0 (theirs stops at 1e-5 of lr);
  5,000 training images are held out for validation (theirs train on all 50,000; ``--val-split 0``
  does too) and the validation split is certified every 5 epochs (theirs every 5, and each of the
  last 10%). Not measured by lipcert: the paper reports 81.6% clean and 70.6 / 57.2 / 42.5%
  certified at 36 / 72 / 108/255 on the CIFAR-10 test set (54.3% and 40.2 / 29.1 / 20.3% on
  CIFAR-100).

A recipe only fills in options that were not given: ``--recipe budget --width 16`` trains width 16.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(model="lipconvnet5", width=32, activation="maxmin", pooling="max", head="ortho",
                  train_terms=6, backward="fast", batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                  schedule="step", loss="ce", augment=True),
    "budget": dict(model="lipconvnet8c", width=8, activation="maxmin", pooling="max", head="lln",
                   train_terms="auto", backward="fast", channels_last=True, batch_size=128, lr=0.1, momentum=0.9,
                   weight_decay=5e-4, schedule="cosine", loss="offset", offset="2x", augment=True,
                   budget_minutes=70.0, eval_every=5),
    "budget-v1": dict(model="lipconvnet5", width=8, activation="maxmin", pooling="max", head="lln",
                      train_terms=6, backward="fast", batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", loss="offset", augment=True, budget_minutes=70.0, eval_every=5),
    "budget-bro": dict(model="convnet_xs", layer="bro", width=16, activation="maxmin", head="lln",
                       model_options={"layers_per_block": 1}, batch_size=128, lr=0.05, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine", loss="offset", augment=True, budget_minutes=70.0,
                       eval_every=5),
    "bronet-cifar": dict(model="liresnet", depth=12, width=512, activation="maxmin",
                         model_options={"block": "bro", "features": 2048, "dense_layers": 9},
                         batch_size=256, epochs=800, warmup_epochs=20.0, optimizer="nadam", lr=1e-3,
                         weight_decay=4e-5, decay_all=True, lookahead=6, lookahead_alpha=0.5, schedule="cosine",
                         grad_clip=3.0, loss="emma_la", train_eps=36 / 255, train_eps_ramp=(0.1, 3.0), la_alpha=1.0,
                         la_beta=5.0, offset=2.0, temperature=0.75, augment=True, eval_every=5),
}


def recipe_defaults(name: str) -> dict[str, Any]:
    """The option values of recipe ``name`` (a copy)."""
    try:
        return dict(RECIPES[name])
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


def apply_recipe(name: str | None, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Options for a run: ``given`` (set by the user) over recipe ``name`` over ``defaults``. A
    recipe's ``model_options`` are defaults key by key: a given ``model_options`` overrides only
    the keys it names."""
    merged = dict(defaults)
    recipe = recipe_defaults(name) if name is not None else {}
    merged.update(recipe)
    if name is not None:
        merged["recipe"] = name
    given = dict(given)
    if recipe.get("model_options") and given.get("model_options"):
        given["model_options"] = {**recipe["model_options"], **given["model_options"]}
    merged.update(given)
    return merged
