"""Collect the runs of a sweep and print them as the paper's Table 1, with a canonicalisation table.

Every job folder of a Hydra multirun holds ``.hydra/config.yaml`` and ``.hydra/overrides.yaml``
(written before the job starts) and, when the job finished, ``metrics.json``. Jobs are grouped by
model (``model.transform``), distortion (``data.distortion``) and the other overrides that differ
between the jobs (the seed and ckpt_path aside); each cell reports test error as mean ± std over seeds with the
number of runs (the mean alone for one run). Jobs without a finite test error are counted, never dropped: as failed when they left
``error.txt`` (or a non-finite error), as unfinished when they left nothing (still running, or
stopped from outside, e.g. by a cluster time limit).

The canonicalisation table (:func:`pose_table`) has the same rows and reports what the transformers
learned: the share of each distortion's spread of pose left after the transformer (``test/pose/*_left``
of :mod:`stn.pose`: angle / log-scale / shift, and for ``p`` and ``e`` the non-similar residual; 1 = the
identity, 0 = every test digit in one pose; and the share of test images lost, whose output shows none
of the digit), mean over seeds; where the runs measured the pose split (``test/pose_split/*`` of
:class:`stn.callbacks.PoseSplit`), also the part of it that follows the distortion within a digit, free of
each digit's own pose.

A model is named by its transform: a chain of stages (``model.transform=[similarity,tps]``) is named by
its last stage, compared with the paper's row of that kind (a similarity is an affine map), and its
chain is shown in the row label.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stn.errors import MissingInputError

__all__ = ["PAPER_ERROR", "Run", "collect_runs", "results_table", "pose_table", "model_kind"]

MODEL_NAMES = {"none": "CNN", "affine": "ST-CNN Aff", "tps": "ST-CNN TPS"}
PAPER_KIND = {"none": "none", "affine": "affine", "similarity": "affine", "tps": "tps"}
POSE_KEYS = ("angle_left", "log_scale_left", "shift_left", "residual_left", "lost")
SPLIT_KEYS = ("angle_within_left", "log_scale_within_left", "shift_within_left")
DISTORTIONS = ["r", "rts", "p", "e"]

PAPER_ERROR = {
    "none": {"r": 1.2, "rts": 0.8, "p": 1.5, "e": 1.4},
    "affine": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.2},
    "tps": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.1},
}
"""Test error (%) on distorted MNIST, Jaderberg et al. 2015, Table 1."""

IGNORED_OVERRIDES = ("seed", "ckpt_path", "+experiment", "experiment", "+sweep", "sweep", "model.transform", "data.distortion")


def model_kind(transform: str | list[str]) -> tuple[str, str]:
    """``(paper kind, chain)`` of a ``model.transform`` value: ``[similarity, tps]`` -> ``("tps", "similarity+tps")``."""
    stages = [transform] if isinstance(transform, str) else [str(stage) for stage in transform]
    chain = "+".join(stages)
    return PAPER_KIND.get(stages[-1], chain), chain


@dataclass
class Run:
    """One job of a sweep."""

    folder: Path
    transform: str
    distortion: str
    settings: dict[str, str]
    chain: str = ""
    variant: str = ""
    error: float | None = None
    pose: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    unfinished: bool = False

    @property
    def label(self) -> str:
        """What tells this row apart from the plain model: its chain of stages and varying overrides."""
        parts = ([self.chain] if self.chain != self.transform else []) + ([self.variant] if self.variant else [])
        return ", ".join(parts)


@dataclass
class Cell:
    errors: list[float] = field(default_factory=list)
    failed: int = 0
    unfinished: int = 0

    def __str__(self) -> str:
        missing = [f"{count} {what}" for count, what in ((self.failed, "failed"), (self.unfinished, "unfinished")) if count]
        if self.errors:
            mean = statistics.fmean(self.errors)
            spread = f" ± {statistics.stdev(self.errors):.2f}" if len(self.errors) > 1 else ""  # one run has no spread
            return ", ".join([f"{mean:.2f}{spread} (n={len(self.errors)})", *missing])
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
    kind, chain = model_kind(config["model"]["transform"])
    run = Run(
        folder=folder,
        transform=kind,
        chain=chain,
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
    metrics = json.loads(metrics_file.read_text()).get("metrics", {})
    run.pose = {key: float(metrics[f"test/pose/{key}"]) for key in POSE_KEYS if f"test/pose/{key}" in metrics}
    run.pose.update({key: float(metrics[f"test/pose_split/{key}"]) for key in SPLIT_KEYS
                     if f"test/pose_split/{key}" in metrics})
    error = metrics.get("test/error")
    if error is None or not math.isfinite(error):
        run.reason = f"metrics.json has no finite test/error ({error})"
    else:
        run.error = float(error)
    return run


def collect_runs(root: str | Path) -> list[Run]:
    """Every job folder below ``root`` (a folder with ``.hydra/config.yaml``), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"No such folder: {root}. Pass a multirun folder, e.g. outputs/multirun/<date>/<time>.")
    folders = sorted(path.parent.parent for path in root.rglob(".hydra/config.yaml"))
    if not folders:
        raise MissingInputError(
            f"No Hydra job folders (with .hydra/config.yaml) below {root}. Pass the folder a sweep "
            "wrote, e.g. outputs/multirun/<date>/<time>."
        )
    runs = [_load_run(folder) for folder in folders]
    _label_variants(runs)
    return runs


def _distortions(runs: list[Run]) -> list[str]:
    return DISTORTIONS + sorted({run.distortion for run in runs} - set(DISTORTIONS))


def _rows(runs: list[Run]) -> list[tuple[str, str, dict[str, list[Run]]]]:
    """``(transform, label, {distortion: runs})`` per row, in the paper's model order."""
    grouped: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for run in runs:
        grouped.setdefault((run.transform, run.label), {}).setdefault(run.distortion, []).append(run)
    order = [t for t in MODEL_NAMES if any(key[0] == t for key in grouped)]
    order += sorted({key[0] for key in grouped} - set(MODEL_NAMES))
    return [(t, label, grouped[(t, label)]) for t in order for (row_t, label) in sorted(grouped) if row_t == t]


def _header(distortions: list[str]) -> list[str]:
    return ["| model | " + " | ".join(d.upper() for d in distortions) + " |", "|---" * (len(distortions) + 1) + "|"]


def _ours(transform: str, label: str) -> str:
    return f"{MODEL_NAMES.get(transform, transform)} (ours{', ' + label if label else ''})"


def results_table(runs: list[Run]) -> str:
    """Markdown table of test error (%): the paper's numbers, then ours, per model and distortion."""
    distortions = _distortions(runs)
    lines = _header(distortions)
    shown_paper = set()
    for transform, label, row in _rows(runs):
        if transform not in shown_paper:
            shown_paper.add(transform)
            paper = PAPER_ERROR.get(transform, {})
            name = MODEL_NAMES.get(transform, transform)
            lines.append(f"| {name} (paper) | " + " | ".join(str(paper.get(d, "—")) for d in distortions) + " |")
        cells = [str(_error_cell(row.get(d, []))) for d in distortions]
        lines.append(f"| {_ours(transform, label)} | " + " | ".join(cells) + " |")
    failures = [run for run in runs if run.error is None]
    if failures:
        lines.append("")
        lines.append("Failed or unfinished jobs:")
        lines.extend(f"- {run.folder}: {run.reason}" for run in failures)
    return "\n".join(lines)


def _error_cell(runs: list[Run]) -> Cell:
    cell = Cell()
    for run in runs:
        if run.unfinished:
            cell.unfinished += 1
        elif run.error is None:
            cell.failed += 1
        else:
            cell.errors.append(run.error)
    return cell


def _pose_cell(runs: list[Run], distortion: str) -> str:
    finished = [run.pose for run in runs if run.error is not None and run.pose]
    if not finished:
        return "—"
    keys = ["angle_left"] if distortion == "r" else ["angle_left", "log_scale_left", "shift_left"]
    text = " / ".join(_mean(finished, key) for key in keys)
    if distortion in ("p", "e"):
        text += f", residual {_mean(finished, 'residual_left')}"
    within = [key.replace("_left", "_within_left") for key in keys]
    if any(key in pose for pose in finished for key in within):
        text += ", within a digit " + " / ".join(_mean(finished, key) for key in within)
    lost = [pose["lost"] for pose in finished if "lost" in pose]
    if any(lost):
        text += f", lost {100 * statistics.fmean(lost):.2g} %"
    return f"{text} (n={len(finished)})"


def _mean(poses: list[dict[str, float]], key: str) -> str:
    values = [pose[key] for pose in poses if key in pose]
    return f"{statistics.fmean(values):.2f}" if values else "—"


def pose_table(runs: list[Run]) -> str:
    """Markdown table of the share of the distortion's pose spread each transformer leaves on the test set.

    Cells: angle / log-scale / shift left (``r``: angle only; ``p``, ``e``: and the non-similar
    residual), the same within a digit where the pose split was measured, and the share of test images
    lost where any was, mean over the finished seeds; the CNN's transformer is the identity (1 everywhere).
    """
    distortions = _distortions(runs)
    lines = _header(distortions)
    for transform, label, row in _rows(runs):
        cells = [_pose_cell(row.get(d, []), d) for d in distortions]
        lines.append(f"| {_ours(transform, label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
