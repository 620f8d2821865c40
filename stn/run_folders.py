"""Run folders: how sweep jobs are named, and which folder ``ckpt_path=last`` continues.

``ckpt_path=last`` means *continue the latest run of this same command*. Before Hydra makes a run
folder, the resolvers below (used by ``configs/hydra/default.yaml``) look for the latest run folder,
or sweep folder under ``-m``, whose command-line overrides equal this command's (``ckpt_path``
aside) and reuse it; without one the run starts in a fresh folder. Inside the folder
:func:`resume_point` then decides: a job with ``metrics.json`` is finished and skipped, one with
``checkpoints/last.ckpt`` resumes from it, any other starts from scratch. Hydra's record of the
resumed command goes to ``.hydra/resumed_<time>/``, so no file of the first run is overwritten.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

__all__ = ["job_folder_name", "register_resolvers", "run_dir", "sweep_dir", "config_subdir", "resume_point", "LAST"]

LAST = "last"  # the ckpt_path value that continues the latest run of the same command


def job_folder_name(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from Hydra's ``override_dirname`` that stays a legal file name.

    Short lists stay as they are (``model.tps.rows=3,seed=2``). Longer ones keep only the last part
    of every key (``rows=3,seed=2``) and, if still too long, are cut with a hash of the whole list;
    the job number in front keeps names unique and ``.hydra/overrides.yaml`` holds the full list.
    """
    if len(overrides) <= limit:
        return overrides
    short = ",".join(_last_key_part(item) for item in overrides.split(","))
    if len(short) <= limit:
        return short
    return short[: limit - 9] + "~" + hashlib.sha1(overrides.encode()).hexdigest()[:8]


def _last_key_part(item: str) -> str:
    """``model.tps.rows=3`` -> ``rows=3``."""
    key, separator, value = item.partition("=")
    return key.rsplit(".", 1)[-1] + separator + value


def _command(overrides: Sequence[str]) -> list[str]:
    """The overrides that define a run: all but ``ckpt_path``."""
    return [str(item) for item in overrides if not str(item).lstrip("+~").startswith("ckpt_path=")]


def _latest(candidates: list[Path], overrides: Sequence[str], read: Callable[[Path], list[list[str]]]) -> Path | None:
    """The last of ``candidates`` (sorted by name: date and time) for which ``read`` lists ``overrides``."""
    wanted = _command(overrides)
    for folder in sorted(candidates, reverse=True):
        try:
            if wanted in [_command(recorded) for recorded in read(folder)]:
                return folder
        except (OSError, yaml.YAMLError, KeyError, TypeError, OverrideParseException):
            continue
    return None


def run_dir(ckpt_path: str | None, fresh: str, output_root: str, overrides: Sequence[str]) -> str:
    """``hydra.run.dir``: ``fresh`` unless ``ckpt_path=last`` finds an earlier run of this command."""
    if ckpt_path != LAST:
        return fresh
    root = Path(output_root)
    candidates = [p.parents[1] for p in root.glob("*/*/.hydra/overrides.yaml") if p.parents[2] != root / "multirun"]
    found = _latest(candidates, overrides, lambda folder: [yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())])
    return str(found) if found else fresh


def sweep_dir(ckpt_path: str | None, fresh: str, output_root: str, overrides: Sequence[str]) -> str:
    """``hydra.sweep.dir``: ``fresh`` unless ``ckpt_path=last`` finds an earlier sweep of this command.

    Hydra resolves it twice: for the whole sweep (``overrides`` as typed, ``seed=1,2,3``) and again in
    every job (that job's values, ``seed=2``); both find the same folder.
    """
    if ckpt_path != LAST:
        return fresh
    candidates = [p.parent for p in Path(output_root, "multirun").glob("*/*/multirun.yaml")]
    found = _latest(candidates, overrides, _sweep_and_jobs)
    return str(found) if found else fresh


def _sweep_and_jobs(folder: Path) -> list[list[str]]:
    """The overrides of the sweep recorded in ``folder``, and those of each of its jobs: the values of the
    sweeper's ``params`` (set by a sweep config such as ``+sweep=paper_table``) and then the command line's,
    combined as Hydra's basic sweeper combines them."""
    hydra = yaml.safe_load((folder / "multirun.yaml").read_text())["hydra"]
    recorded = _command(hydra["overrides"]["task"])
    params = [f"{key}={value}" for key, value in ((hydra.get("sweeper") or {}).get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *recorded])
    return [recorded, *(job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch)]


def config_subdir(output_dir: str, stamp: str) -> str:
    """``hydra.output_subdir``: ``.hydra``, or ``.hydra/resumed_<stamp>`` where a run already wrote one."""
    return f".hydra/resumed_{stamp}" if Path(output_dir, ".hydra", "config.yaml").is_file() else ".hydra"


def resume_point(output_dir: str | Path) -> tuple[str, Path | None]:
    """What ``ckpt_path=last`` does in ``output_dir``: ``("finished", metrics.json)``,
    ``("resume", last.ckpt)`` or ``("start", None)``."""
    folder = Path(output_dir)
    if (folder / "metrics.json").is_file():
        return "finished", folder / "metrics.json"
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return "resume", folder / "checkpoints" / "last.ckpt"
    return "start", None


def register_resolvers() -> None:
    """The resolvers ``configs/hydra`` uses; safe to call again."""
    for name, function in (("job_folder_name", job_folder_name), ("run_dir", run_dir), ("sweep_dir", sweep_dir),
                           ("config_subdir", config_subdir)):
        OmegaConf.register_new_resolver(name, function, replace=True)
