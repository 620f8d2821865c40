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

__all__ = ["PHASES", "profile_training_step"]

PHASES = ("data + distortion", "loc-net", "grid + sampling", "classifier", "backward", "optimiser")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_training_step(
    model: STNClassifier, datamodule: MNISTDataModule, device: torch.device, steps: int = 30, warmup: int = 5,
    autocast: torch.dtype | None = None,
) -> dict:
    """Median milliseconds of each phase of a training step and of an evaluation batch, and rates.

    Args:
        model: the model, on ``device``; trained in place for ``warmup + steps`` steps.
        datamodule: set up for ``"fit"``; its training batches are distorted at full strength.
        device: where the model runs (batches are moved there, as Lightning does).
        autocast: run the forward phases under ``torch.autocast`` in this dtype (as Lightning's
            ``precision="bf16-mixed"`` / ``"16-mixed"`` do); ``None``: full precision.

    Returns:
        ``{"phases_ms": {phase: ms}, "step_ms", "train_images_per_s", "eval_images_per_s",
        "batch_size", "peak_memory_mb"}``; peak memory is the CUDA allocator's peak on a GPU, else the
        process's peak resident set size.
    """
    optimizer = model.build_optimizer()
    generator = datamodule.training_generator(epoch=0, device=device)
    loader = iter(datamodule.train_dataloader())
    model.train()
    timings: dict[str, list[float]] = {phase: [] for phase in PHASES}
    batch_size = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        state: dict = {}

        def data() -> None:
            images, labels = next(loader)
            state["images"] = datamodule.distort(images.to(device), generator)
            state["labels"] = labels.to(device)

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
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        forward = (localize, sample, classify)
        phases: tuple[Callable[[], None], ...] = (data, *(_autocast(run, device, autocast) for run in forward),
                                                  backward, step_optimizer)
        for phase, run in zip(PHASES, phases):
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            if step >= warmup:
                timings[phase].append(time.perf_counter() - start)
        batch_size = state["labels"].shape[0]
    phases_ms = {phase: 1e3 * statistics.median(times) for phase, times in timings.items()}
    step_ms = sum(phases_ms.values())
    return {
        "phases_ms": phases_ms,
        "step_ms": step_ms,
        "train_images_per_s": 1e3 * batch_size / step_ms,
        "eval_images_per_s": _eval_images_per_second(model, datamodule, device, steps, warmup, autocast),
        "batch_size": batch_size,
        "peak_memory_mb": _peak_memory_mb(device),
    }


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


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
