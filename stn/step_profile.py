"""Where the time of one training step goes: data + distortion, loc-net, grid + sampling, classifier,
backward, optimiser (``python scripts/bench.py train``).

The phases are the ones :meth:`stn.module.STNClassifier.training_step` runs, called one by one with
the device synchronised between them, so each is timed alone; the total is their sum. Evaluation is
timed as the no-grad forward pass of a validation batch.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from stn.data import MNISTDataModule
from stn.module import STNClassifier

__all__ = ["PHASES", "StepProfile", "profile_training_steps"]

PHASES = ("data + distortion", "loc-net", "grid + sampling", "classifier", "backward", "optimiser")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepProfile:
    """Times training steps of one model, phase by phase, a few steps per call to :meth:`run`.

    Args:
        model: the model, on ``device``; trained in place by every step run.
        datamodule: set up for ``"fit"``; its training batches are distorted at full strength.
        device: where the model runs (batches are moved there, as Lightning does).
        autocast: run the forward phases under ``torch.autocast`` in this dtype (as Lightning's
            ``precision="bf16-mixed"`` / ``"16-mixed"`` do); ``None``: full precision.
    """

    def __init__(self, model: STNClassifier, datamodule: MNISTDataModule, device: torch.device,
                 autocast: torch.dtype | None = None):
        self.model, self.datamodule, self.device, self.autocast = model, datamodule, device, autocast
        self.optimizer = model.build_optimizer()
        self.generator = datamodule.training_generator(epoch=0, device=device)
        self.loader = iter(datamodule.train_dataloader())
        self.timings: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.batch_size = 0
        self.peak_cuda_bytes = 0

    def run(self, steps: int, record: bool = True) -> None:
        """Train ``steps`` steps; keep each phase's time unless ``record`` is ``False`` (warm-up)."""
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(steps):
            for phase, seconds in zip(PHASES, self._step()):
                if record:
                    self.timings[phase].append(seconds)
        if self.device.type == "cuda":
            self.peak_cuda_bytes = max(self.peak_cuda_bytes, torch.cuda.max_memory_allocated(self.device))

    def _step(self) -> list[float]:
        model, state = self.model, {}

        def data() -> None:
            images, labels = next(self.loader)
            state["images"] = self.datamodule.distort(images.to(self.device), self.generator)
            state["labels"] = labels.to(self.device)

        def localize() -> None:
            state["params"] = model.transformer.localize(state["images"])

        def sample() -> None:
            grid = model.transformer.grid(state["params"], state["images"])
            state["warped"] = model.transformer.sample(state["images"], grid)

        def classify() -> None:
            state["loss"] = F.cross_entropy(model.classify(state["warped"]), state["labels"])

        def backward() -> None:
            state["loss"].backward()

        def step_optimizer() -> None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        forward = (localize, sample, classify)
        seconds = []
        for run in (data, *(_autocast(run, self.device, self.autocast) for run in forward), backward, step_optimizer):
            _synchronize(self.device)
            start = time.perf_counter()
            run()
            _synchronize(self.device)
            seconds.append(time.perf_counter() - start)
        self.batch_size = state["labels"].shape[0]
        return seconds

    def result(self, eval_steps: int = 30, eval_warmup: int = 5) -> dict:
        """Median milliseconds of each phase over the recorded steps, and rates.

        Returns:
            ``{"phases_ms": {phase: ms}, "step_ms", "train_images_per_s", "eval_images_per_s", "batch_size",
            "peak_memory_mb"}``; evaluation is timed here (``eval_steps`` no-grad forward passes of a
            validation batch); peak memory is the CUDA allocator's peak while this model's steps ran on a
            GPU, else the process's peak resident set size (of every model the process profiled so far).
        """
        phases_ms = {phase: 1e3 * statistics.median(times) for phase, times in self.timings.items()}
        step_ms = sum(phases_ms.values())
        return {
            "phases_ms": phases_ms,
            "step_ms": step_ms,
            "train_images_per_s": 1e3 * self.batch_size / step_ms,
            "eval_images_per_s": _eval_images_per_second(self.model, self.datamodule, self.device, eval_steps,
                                                         eval_warmup, self.autocast),
            "batch_size": self.batch_size,
            "peak_memory_mb": self.peak_cuda_bytes / 2**20 if self.device.type == "cuda" else _peak_memory_mb(),
        }


def profile_training_steps(profiles: list[StepProfile], steps: int = 30, warmup: int = 5, rounds: int = 5) -> list[dict]:
    """:meth:`StepProfile.result` of each profile after ``warmup`` untimed and ``steps`` timed steps, the
    timed steps taken in ``rounds`` turns (a share of each profile's steps per turn, one profile after
    another), so that every model is timed across the same stretch of time and a host whose speed
    drifts (a shared machine) moves their ratios less than their times."""
    for profile in profiles:
        profile.run(warmup, record=False)
    for turn in range(rounds):
        for profile in profiles:
            profile.run(steps // rounds + (turn < steps % rounds))
    return [profile.result(steps, warmup) for profile in profiles]


def _autocast(run: Callable[[], None], device: torch.device, dtype: torch.dtype | None) -> Callable[[], None]:
    def run_in_autocast() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            run()

    return run_in_autocast


@torch.no_grad()
def _eval_images_per_second(model: STNClassifier, datamodule: MNISTDataModule, device: torch.device,
                            steps: int, warmup: int, autocast: torch.dtype | None) -> float:
    model.eval()
    images = next(iter(datamodule.val_dataloader()))[0].to(device)
    forward = _autocast(lambda: model(images), device, autocast)
    times = []
    for step in range(warmup + steps):
        _synchronize(device)
        start = time.perf_counter()
        forward()
        _synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(times)


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
