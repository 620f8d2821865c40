"""scripts/table.py on hand-made job folders: grouping, mean ± std, failed and missing jobs."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stn.results import collect_runs, pose_table, results_table

ROOT = Path(__file__).resolve().parents[1]


def make_job(folder: Path, transform, distortion: str, seed: int, error: float | None, extra=(), pose=None,
             split=None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "model": {"transform": transform}, "data": {"distortion": distortion}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"data.distortion={distortion}", f"seed={seed}", *extra]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if error is not None:
        metrics = {"test/error": error, "test/acc": 1 - error / 100}
        metrics.update({f"test/pose/{key}": value for key, value in (pose or {}).items()})
        metrics.update({f"test/pose_split/{key}": value for key, value in (split or {}).items()})
        (folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))


def table_row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_mean_std_and_counts(tmp_path):
    make_job(tmp_path / "0", "tps", "rts", 1, 0.6)
    make_job(tmp_path / "1", "tps", "rts", 2, 0.9)
    make_job(tmp_path / "2", "none", "rts", 1, 1.5)
    table = results_table(collect_runs(tmp_path))
    expected = f"{statistics.fmean([0.6, 0.9]):.2f} ± {statistics.stdev([0.6, 0.9]):.2f} (n=2)"
    assert table_row(table, "ST-CNN TPS (ours)") == ["no run", expected, "no run", "no run"]
    assert table_row(table, "ST-CNN TPS (paper)") == ["0.7", "0.5", "0.8", "1.1"]
    assert table_row(table, "CNN (ours)") == ["no run", "1.50 (n=1)", "no run", "no run"]
    assert table_row(table, "CNN (paper)") == ["1.2", "0.8", "1.5", "1.4"]


def test_failed_and_unfinished_jobs_are_marked(tmp_path):
    make_job(tmp_path / "0", "affine", "p", 1, 0.8)
    make_job(tmp_path / "1", "affine", "p", 2, None)
    make_job(tmp_path / "2", "affine", "e", 1, None)
    (tmp_path / "2" / "error.txt").write_text("Traceback ...\nValueError: loss is NaN\n")
    make_job(tmp_path / "3", "affine", "p", 3, None)
    (tmp_path / "3" / "error.txt").write_text("Traceback ...\nFloatingPointError: The training loss is nan\n")
    make_job(tmp_path / "4", "affine", "r", 1, float("nan"))
    make_job(tmp_path / "5", "affine", "rts", 1, None)
    table = results_table(collect_runs(tmp_path))
    row = table_row(table, "ST-CNN Aff (ours)")
    assert row[0] == "failed (1 of 1)"
    assert row[1] == "unfinished (1 of 1)"
    assert row[2] == "0.80 (n=1), 1 failed, 1 unfinished"
    assert row[3] == "failed (1 of 1)"
    assert f"- {tmp_path / '1'}: unfinished: no metrics.json and no error.txt" in table
    assert f"- {tmp_path / '2'}: ValueError: loss is NaN" in table
    assert f"- {tmp_path / '3'}: FloatingPointError: The training loss is nan" in table
    assert f"- {tmp_path / '4'}: metrics.json has no finite test/error (nan)" in table


def test_other_overrides_make_their_own_rows(tmp_path):
    make_job(tmp_path / "0", "tps", "rts", 1, 0.5, extra=["model.tps.rows=3", "trainer.max_epochs=2"])
    make_job(tmp_path / "1", "tps", "rts", 1, 0.7, extra=["model.tps.rows=5", "trainer.max_epochs=2"])
    table = results_table(collect_runs(tmp_path))
    assert table_row(table, "ST-CNN TPS (ours, model.tps.rows=3)")[1] == "0.50 (n=1)"
    assert table_row(table, "ST-CNN TPS (ours, model.tps.rows=5)")[1] == "0.70 (n=1)"


def test_script_prints_table_and_rejects_empty_folder(tmp_path):
    make_job(tmp_path / "sweep" / "0_seed=1", "tps", "r", 1, 0.4)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "table.py"), str(tmp_path / "sweep")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert table_row(done.stdout, "ST-CNN TPS (ours)")[0] == "0.40 (n=1)"
    with pytest.raises(FileNotFoundError, match="No Hydra job folders"):
        collect_runs(tmp_path / "sweep" / "0_seed=1" / ".hydra")


def test_chains_are_named_by_their_last_stage_and_the_pose_table_averages_seeds(tmp_path):
    pose_1 = {"angle_left": 0.6, "log_scale_left": 0.7, "shift_left": 0.1, "lost": 0.0}
    pose_2 = {"angle_left": 0.8, "log_scale_left": 0.5, "shift_left": 0.3}
    make_job(tmp_path / "0", ["similarity", "tps"], "rts", 1, 0.6, pose=pose_1)
    split = {"angle_within_left": 0.5, "log_scale_within_left": 0.4, "shift_within_left": 0.1, "angle_between_left": 0.3}
    make_job(tmp_path / "1", ["similarity", "tps"], "rts", 2, 0.8, pose=pose_2, split=split)
    make_job(tmp_path / "2", "none", "rts", 1, 1.5, pose={"angle_left": 1.0, "log_scale_left": 1.0, "shift_left": 1.0})
    make_job(tmp_path / "3", ["similarity", "affine"], "e", 1, 1.0,
             pose={"angle_left": 0.9, "log_scale_left": 0.8, "shift_left": 0.5, "residual_left": 0.95, "lost": 1e-4})
    make_job(tmp_path / "4", "tps", "r", 1, 0.9, pose={"angle_left": 0.4}, split={"angle_within_left": 0.2})
    runs = collect_runs(tmp_path)
    table = results_table(runs)
    assert table_row(table, "ST-CNN TPS (ours, similarity+tps)")[1] == "0.70 ± 0.14 (n=2)"
    assert table_row(table, "ST-CNN Aff (ours, similarity+affine)")[3] == "1.00 (n=1)"
    assert table_row(table, "ST-CNN Aff (paper)") == ["0.7", "0.5", "0.8", "1.2"]
    poses = pose_table(runs)
    # the split's within-digit share, averaged over the seeds that measured it
    assert table_row(poses, "ST-CNN TPS (ours, similarity+tps)")[1] == "0.70 / 0.60 / 0.20, within a digit 0.50 / 0.40 / 0.10 (n=2)"
    assert table_row(poses, "CNN (ours)")[1] == "1.00 / 1.00 / 1.00 (n=1)"
    assert table_row(poses, "ST-CNN Aff (ours, similarity+affine)")[3] == "0.90 / 0.80 / 0.50, residual 0.95, lost 0.01 % (n=1)"
    assert table_row(poses, "ST-CNN TPS (ours)")[0] == "0.40, within a digit 0.20 (n=1)"
    assert table_row(poses, "ST-CNN TPS (ours)")[1] == "—"
