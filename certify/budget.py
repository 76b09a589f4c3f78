"""Training under a wall-clock budget: plan the number of steps from measured step times.

A budgeted run (``TrainConfig.budget_minutes``) does not know in advance how many steps fit, yet the
learning-rate schedule needs the total. :class:`BudgetPlanner` times the first steps (after a
warm-up that pays one-off costs: allocator growth, kernel selection), sets the planned total to the
steps done plus the steps that fit in the time left, and re-plans every 5% of the planned steps
and after every epoch from the average cost per step so far (which then includes the per-epoch
work: power iterations, the data shuffle). The schedule is evaluated on the planned total, so it
ends where the budget ends, and a hard stop ends training the moment the budget is spent, whatever
the plan said.

Only training time counts: the training loop pauses the clock while it certifies the validation
split and writes checkpoints.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

from .errors import ConfigError

_clock = time.perf_counter  # module-level so that tests can drive a whole training run with a fake clock


class BudgetPlanner:
    """Plans and enforces a training run of ``budget_s`` seconds of (unpaused) wall clock.

    Args:
        budget_s: the training budget in seconds.
        warmup_steps: steps whose times are ignored (one-off costs).
        measure_steps: steps timed after the warm-up before the first plan.
        margin: fraction of the remaining time held back when planning (for per-epoch overheads
            that the step times do not show and for timing noise); the hard stop covers the rest.
        used_s, planned_steps, steps_done: the state of an interrupted run (see :meth:`state`).
        clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, budget_s: float, *, warmup_steps: int = 2, measure_steps: int = 8, margin: float = 0.02,
                 used_s: float = 0.0, planned_steps: int | None = None, steps_done: int = 0,
                 clock: Callable[[], float] | None = None) -> None:
        if not (budget_s > 0 and math.isfinite(budget_s)):
            raise ConfigError(f"the time budget must be positive, got {budget_s} s")
        if warmup_steps < 0 or measure_steps < 1 or not 0 <= margin < 1:
            raise ConfigError("budget planner: warmup_steps >= 0, measure_steps >= 1 and 0 <= margin < 1")
        self.budget_s, self.margin = float(budget_s), margin
        self.warmup_steps, self.measure_steps = warmup_steps, measure_steps
        self.clock = clock or _clock
        self._used = float(used_s)
        self._since: float | None = None
        self._step_start: float | None = None
        self._times: list[float] = []
        self.steps_done = int(steps_done)
        self._session_steps = 0
        self._session_start_used = self._used
        self._session_first_step = self.steps_done
        self._last_plan_step = self.steps_done
        self.planned_steps = planned_steps

    # ---- the clock ------------------------------------------------------------------------
    def resume(self) -> None:
        """Start (or restart) counting time."""
        if self._since is None:
            self._since = self.clock()

    def pause(self) -> None:
        """Stop counting time (validation, checkpoints)."""
        self._step_start = None  # the interval across a pause is not a step time
        if self._since is not None:
            self._used += self.clock() - self._since
            self._since = None

    @property
    def used_s(self) -> float:
        """Budget seconds spent so far."""
        return self._used + (self.clock() - self._since if self._since is not None else 0.0)

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.budget_s - self.used_s)

    def out_of_time(self) -> bool:
        return self.used_s >= self.budget_s

    # ---- steps ------------------------------------------------------------------------------
    def step_started(self) -> None:
        """Call at the top of every step: a step's time is the interval from one call to the next
        (everything the loop does per step), unless the clock was paused in between."""
        now = self.clock()
        if self._step_start is not None:
            self._session_steps += 1
            if self._session_steps > self.warmup_steps:
                self._times.append(now - self._step_start)
        self._step_start = now

    def step_done(self) -> bool:
        """Record one finished step; plan once the measurement window is complete, then re-plan
        every 5% of the planned steps (at least 20), so that a run shorter than an epoch also
        follows the measured speed. Returns True when the plan changed at this step (the same
        step on every process of a distributed run, whose plans must then be agreed)."""
        self.steps_done += 1
        if self.planned_steps is None:
            if len(self._times) >= self.measure_steps:
                self._plan(statistics.median(self._times))
                return True
            return False
        if self.steps_done - self._last_plan_step >= max(20, self.planned_steps // 20):
            self.replan()
            return True
        return False

    def replan(self) -> None:
        """Re-plan from the average cost per step since this session started (call it at the end
        of an epoch, so that per-epoch work is part of the average)."""
        done = self.steps_done - self._session_first_step
        if self.planned_steps is None or done <= self.warmup_steps:
            return
        per_step = (self.used_s - self._session_start_used) / done
        self._plan(per_step)

    def _plan(self, seconds_per_step: float) -> None:
        fit = math.floor(self.remaining_s * (1 - self.margin) / max(seconds_per_step, 1e-9))
        self.planned_steps = self.steps_done + max(fit, 0)
        self._last_plan_step = self.steps_done

    @property
    def seconds_per_step(self) -> float | None:
        """The median measured step time (None before the first measured step)."""
        return statistics.median(self._times) if self._times else None

    def total_steps(self, fallback: int) -> int:
        """The planned total, or ``fallback`` before the first plan (the schedule then starts as
        if the run were ``fallback`` steps long; the first plan comes after a few steps)."""
        return self.planned_steps if self.planned_steps is not None else fallback

    def finished(self) -> bool:
        """True once the plan's steps are done or the budget is spent."""
        return self.out_of_time() or (self.planned_steps is not None and self.steps_done >= self.planned_steps)

    def state(self) -> dict[str, float | int | None]:
        """What a resumed run needs (saved in ``train_state.pt``)."""
        return {"budget_s": self.budget_s, "used_s": self.used_s, "planned_steps": self.planned_steps,
                "steps_done": self.steps_done}
