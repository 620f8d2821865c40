"""Progress lines for long jobs: how long a job will take, estimated from its first steps on this machine,
and the time left after each epoch."""

from __future__ import annotations

import logging
import time

__all__ = ["StepClock", "duration"]

FIRST_STEPS = 10  # steps timed for the first estimate (the very first, which warms kernels up, left out)


def duration(seconds: float) -> str:
    """``seconds`` for a reader: ``42 s``, ``7 min 05 s``, ``1 h 02 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class StepClock:
    """Logs a job's expected duration once its first steps are timed, and the time left after each epoch.

    Args:
        task: what the job is, the start of every line (``pose pretraining resnet18 at layer2``).
        total_steps: steps the whole job takes.
        logger: where the lines go.
    """

    def __init__(self, task: str, total_steps: int, logger: logging.Logger):
        self.task, self.total_steps, self.log = task, total_steps, logger
        self.steps = 0
        self.start = time.perf_counter()
        self.after_first: float | None = None

    def step(self) -> None:
        """Count one step; after the first few, log what the whole job will take at their pace."""
        self.steps += 1
        if self.steps == 1:
            self.after_first = time.perf_counter()
        elif self.steps == min(FIRST_STEPS, self.total_steps):
            per_step = (time.perf_counter() - self.after_first) / (self.steps - 1)
            self.log.info(
                "%s: %d steps at %.0f ms a step on this machine (its first steps): about %s in all",
                self.task, self.total_steps, 1e3 * per_step, duration(per_step * self.total_steps),
            )

    def epoch(self, epoch: int, epochs: int, summary: str) -> None:
        """Log the end of ``epoch`` (0-based) of ``epochs``: ``summary``, the time so far and the time left."""
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(1, self.steps) * (self.total_steps - self.steps)
        self.log.info("%s: epoch %d/%d, %s; %s so far, about %s left",
                      self.task, epoch + 1, epochs, summary, duration(elapsed), duration(left))
