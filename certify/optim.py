"""Optimisers of :func:`certify.train.train`: SGD (the SOC papers'), NAdam (the LiResNet and BRONet
trainers'), and Lookahead around either.

- ``sgd``: ``torch.optim.SGD`` with momentum (Nesterov off), as the SOC reference.
- ``nadam``: ``torch.optim.NAdam`` (Dozat, 2016) with torch's defaults (betas 0.9 / 0.999,
  momentum decay 4e-3), weight decay added to the gradient (L2), as the BRONet trainer builds it.
- :class:`Lookahead` (Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step
  back", NeurIPS 2019): slow weights, which start at the initial weights; every ``k`` steps of the
  base optimiser they move ``alpha`` of the way to the fast weights, and the fast weights restart
  from them. :meth:`Lookahead.sync` does that update at once: the BRONet trainer calls it (timm's
  ``sync_lookahead``) after every epoch, so the weights it validates and saves are the slow ones.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

OPTIMIZERS = ("sgd", "nadam")


class Lookahead:
    """Lookahead around ``base`` (see the module docstring): ``k`` >= 1 base steps per slow
    update, ``alpha`` in (0, 1]. Exposes what the training loop uses of an optimiser
    (``param_groups``, ``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``); its state
    (the base optimiser's, the slow weights and the step count) resumes bit for bit."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"Lookahead needs k >= 1 steps between slow updates, got {k!r}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ConfigError(f"Lookahead alpha must be in (0, 1], got {alpha!r}")
        self.base, self.k, self.alpha = base, k, float(alpha)
        self.steps = 0
        self.slow = [[p.detach().clone() for p in g["params"]] for g in base.param_groups]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.base.step()
        self.steps += 1
        if self.steps % self.k == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """slow += alpha (fast - slow); fast = slow, for every parameter."""
        for group, slow in zip(self.base.param_groups, self.slow):
            for p, s in zip(group["params"], slow):
                s.add_(p.detach() - s, alpha=self.alpha)
                p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "lookahead": {
            "k": self.k, "alpha": self.alpha, "steps": self.steps, "slow": [s for group in self.slow for s in group]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        la = state.get("lookahead") if isinstance(state, dict) else None
        if la is None:
            raise ConfigError("this optimizer state has no Lookahead part (the run was trained without --lookahead)")
        if (la["k"], la["alpha"]) != (self.k, self.alpha):
            raise ConfigError(f"the saved Lookahead has k={la['k']}, alpha={la['alpha']}; this run asks for "
                              f"k={self.k}, alpha={self.alpha}")
        mine = [s for group in self.slow for s in group]
        if len(la["slow"]) != len(mine) or any(a.shape != b.shape for a, b in zip(la["slow"], mine)):
            raise ConfigError("the saved Lookahead slow weights do not match this model's parameters")
        self.base.load_state_dict(state["base"])
        with torch.no_grad():
            for s, saved in zip(mine, la["slow"]):
                s.copy_(saved)
        self.steps = int(la["steps"])


def build_optimizer(groups: list[dict], name: str = "sgd", *, lr: float, momentum: float = 0.9, lookahead: int = 0,
                    lookahead_alpha: float = 0.5) -> torch.optim.Optimizer | Lookahead:
    """The optimiser ``name`` over parameter ``groups`` (each with its ``weight_decay``), wrapped
    in :class:`Lookahead` when ``lookahead`` (its k) is >= 1. ``momentum`` is SGD's."""
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    elif name == "nadam":
        opt = torch.optim.NAdam(groups, lr=lr)
    else:
        raise ConfigError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if lookahead:
        return Lookahead(opt, lookahead, lookahead_alpha)
    return opt

