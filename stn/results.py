"""Collect the runs of a sweep and print them as the paper's Table 1.

Every job folder of a Hydra multirun holds ``.hydra/config.yaml`` and ``.hydra/overrides.yaml``
(written before the job starts) and, when the job finished, ``metrics.json``. Jobs are grouped by
model (``model.transform``), distortion (``data.distortion``) and the other overrides that differ
between the jobs (the seed aside); each cell reports test error as mean ± std over seeds with the
number of runs. Jobs without a finite test error are counted, never dropped: as failed when they left
``error.txt`` (or a non-finite error), as unfinished when they left nothing (still running, or
stopped from outside, e.g. by a cluster time limit).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["PAPER_ERROR", "Run", "collect_runs", "results_table"]

MODEL_NAMES = {"none": "CNN", "affine": "ST-CNN Aff", "tps": "ST-CNN TPS"}
DISTORTIONS = ["r", "rts", "p", "e"]

PAPER_ERROR = {
    "none": {"r": 1.2, "rts": 0.8, "p": 1.5, "e": 1.4},
    "affine": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.2},
    "tps": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.1},
}
"""Test error (%) on distorted MNIST, Jaderberg et al. 2015, Table 1."""

IGNORED_OVERRIDES = ("seed", "+experiment", "experiment", "+sweep", "sweep", "model.transform", "data.distortion")


@dataclass
class Run:
    """One job of a sweep."""

    folder: Path
    transform: str
    distortion: str
    settings: dict[str, str]
    variant: str = ""
    error: float | None = None
    reason: str = ""
    unfinished: bool = False


@dataclass
class Cell:
    errors: list[float] = field(default_factory=list)
    failed: int = 0
    unfinished: int = 0

    def __str__(self) -> str:
        missing = [f"{count} {what}" for count, what in ((self.failed, "failed"), (self.unfinished, "unfinished")) if count]
        if self.errors:
            mean = statistics.fmean(self.errors)
            spread = statistics.stdev(self.errors) if len(self.errors) > 1 else 0.0
            return ", ".join([f"{mean:.2f} ± {spread:.2f} (n={len(self.errors)})", *missing])
        if self.failed and self.unfinished:
            return ", ".join(missing)
        if self.failed:
            return f"failed ({self.failed} of {self.failed})"
        if self.unfinished:
            return f"unfinished ({self.unfinished} of {self.unfinished})"
        return "no run"


def _settings(overrides: list[str]) -> dict[str, str]:
    """A job's overrides as ``{key: value}``, seed and the table's own axes left out."""
    pairs = (item.partition("=") for item in overrides)
    return {key: value for key, _, value in pairs if key not in IGNORED_OVERRIDES}


def _label_variants(runs: list[Run]) -> None:
    """Set each run's ``variant`` to the overrides that differ between the runs (shared ones say nothing)."""
    keys = {key for run in runs for key in run.settings}
    varying = sorted(key for key in keys if len({run.settings.get(key) for run in runs}) > 1)
    for run in runs:
        run.variant = ",".join(f"{key}={run.settings[key]}" for key in varying if key in run.settings)


def _exception_line(traceback: str) -> str:
    """The innermost exception of a traceback (Hydra wraps errors of instantiated objects)."""
    lines = traceback.strip().splitlines()
    exceptions = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return (exceptions or lines)[-1]


def _load_run(folder: Path) -> Run:
    config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    run = Run(
        folder=folder,
        transform=str(config["model"]["transform"]),
        distortion=str(config["data"]["distortion"]),
        settings=_settings(overrides or []),
    )
    metrics_file = folder / "metrics.json"
    if not metrics_file.exists():
        error_file = folder / "error.txt"
        if error_file.exists():
            run.reason = _exception_line(error_file.read_text())
        else:
            run.unfinished = True
            run.reason = "unfinished: no metrics.json and no error.txt (still running, or stopped from outside)"
        return run
    error = json.loads(metrics_file.read_text()).get("metrics", {}).get("test/error")
    if error is None or not math.isfinite(error):
        run.reason = f"metrics.json has no finite test/error ({error})"
    else:
        run.error = float(error)
    return run


def collect_runs(root: str | Path) -> list[Run]:
    """Every job folder below ``root`` (a folder with ``.hydra/config.yaml``), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"No such folder: {root}. Pass a multirun folder, e.g. outputs/multirun/<date>/<time>.")
    folders = sorted(path.parent.parent for path in root.rglob(".hydra/config.yaml"))
    if not folders:
        raise FileNotFoundError(
            f"No Hydra job folders (with .hydra/config.yaml) below {root}. Pass the folder a sweep "
            "wrote, e.g. outputs/multirun/<date>/<time>."
        )
    runs = [_load_run(folder) for folder in folders]
    _label_variants(runs)
    return runs


def results_table(runs: list[Run]) -> str:
    """Markdown table of test error (%): the paper's numbers, then ours, per model and distortion."""
    distortions = DISTORTIONS + sorted({run.distortion for run in runs} - set(DISTORTIONS))
    cells: dict[tuple[str, str], dict[str, Cell]] = {}
    for run in runs:
        cell = cells.setdefault((run.transform, run.variant), {}).setdefault(run.distortion, Cell())
        if run.unfinished:
            cell.unfinished += 1
        elif run.error is None:
            cell.failed += 1
        else:
            cell.errors.append(run.error)

    lines = [
        "| model | " + " | ".join(d.upper() for d in distortions) + " |",
        "|---" * (len(distortions) + 1) + "|",
    ]
    transforms = [t for t in MODEL_NAMES if any(key[0] == t for key in cells)]
    transforms += sorted({key[0] for key in cells} - set(MODEL_NAMES))
    for transform in transforms:
        name = MODEL_NAMES.get(transform, transform)
        paper = PAPER_ERROR.get(transform, {})
        lines.append(f"| {name} (paper) | " + " | ".join(str(paper.get(d, "—")) for d in distortions) + " |")
        for (row_transform, variant), row in sorted(cells.items()):
            if row_transform != transform:
                continue
            label = f"{name} (ours{', ' + variant if variant else ''})"
            lines.append(f"| {label} | " + " | ".join(str(row.get(d, Cell())) for d in distortions) + " |")
    failures = [run for run in runs if run.error is None]
    if failures:
        lines.append("")
        lines.append("Failed or unfinished jobs:")
        lines.extend(f"- {run.folder}: {run.reason}" for run in failures)
    return "\n".join(lines)
