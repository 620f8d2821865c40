"""Runs that survive: a run killed with SIGKILL resumes to the same metrics, a stopped sweep picks up
where it stopped, checkpoints are written atomically, same seed means the same metrics.

End to end through ``scripts/train.py`` on real MNIST (``$STN_DATA_DIR``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stn.checkpoints import AtomicCheckpointIO, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # trainer.limit_train_batches of these runs: long enough an epoch to be killed inside it


def command(root: Path, *overrides: str) -> list[str]:
    """``scripts/train.py`` writing below ``root``; a ``-m`` among ``overrides`` goes first."""
    flags = [item for item in overrides if item == "-m"]
    rest = [item for item in overrides if item != "-m"]
    return [sys.executable, str(REPO / "scripts" / "train.py"), *flags, f"paths.output_root={root}", *rest]


def run(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(root, *overrides), cwd=root.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fail if it ended before."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def epoch_checkpoint_written(folder: Path, epochs: int):
    """``ready()`` for :func:`kill_when`: ``last.ckpt`` holds the end of epoch ``epochs - 1``."""
    def ready() -> bool:
        last = folder / "checkpoints" / "last.ckpt"
        try:
            return last.is_file() and load_checkpoint(last)["global_step"] >= epochs * STEPS
        except Exception:  # being replaced at this very moment
            return False
    return ready


def run_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/.hydra"))


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def loss_steps(folder: Path) -> list[int]:
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


@pytest.fixture()
def resumable_run(tiny_run) -> list[str]:
    """A tiny TPS run of 3 epochs with dropout (which draws from the global generator)."""
    return ["+experiment=mnist_tps", *tiny_run, "trainer.max_epochs=3", f"trainer.limit_train_batches={STEPS}",
            "model.loc_net.weights=null", "model.classifier.dropout=0.3", "data.growth_epochs=1"]


@pytest.mark.slow
@pytest.mark.mnist
def test_a_run_killed_mid_epoch_and_resumed_with_ckpt_path_last_ends_bit_identical(tmp_path, resumable_run):
    straight = tmp_path / "straight"
    run(straight, *resumable_run)
    (expected,) = run_folders(straight)

    root = tmp_path / "killed"
    root.mkdir()
    process = subprocess.Popen(command(root, *resumable_run), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not run_folders(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    (folder,) = run_folders(root)
    kill_when(process, epoch_checkpoint_written(folder, 1))  # inside the second epoch
    assert not (folder / "metrics.json").exists()
    first_files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "checkpoints" not in p.parts}

    done = run(root, *resumable_run, "ckpt_path=last")
    assert run_folders(root) == [folder], "the resumed run continues in the killed run's folder"
    assert f"Run folder: {folder}" in done.stdout
    resumed, reference = metrics(folder), metrics(expected)
    assert resumed["metrics"] == reference["metrics"]  # bit-identical: every float equal
    assert (resumed["epochs"], resumed["global_step"]) == (reference["epochs"], reference["global_step"]) == (3, 3 * STEPS)
    for path, content in first_files.items():  # nothing the first run wrote is overwritten
        now = path.read_bytes()
        assert now.startswith(content) if path.suffix == ".log" else now == content, path
    assert len(list((folder / ".hydra").glob("resumed_*/overrides.yaml"))) == 1
    assert loss_steps(folder) == list(range(3 * STEPS)), "TensorBoard shows one curve, the replayed steps once"


@pytest.mark.slow
@pytest.mark.mnist
def test_a_stopped_sweep_rerun_with_ckpt_path_last_skips_finished_jobs_and_resumes_the_rest(tmp_path, tiny_run):
    sweep = ["-m", "+experiment=mnist_tps", *tiny_run, "trainer.max_epochs=2", f"trainer.limit_train_batches={STEPS}",
             "model.loc_net.weights=null", "seed=1,2,3"]
    root = tmp_path / "outputs"
    process = subprocess.Popen(command(root, *sweep), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    job = lambda number: next(iter(root.glob(f"multirun/*/*/{number}_*")), None)  # noqa: E731
    kill_when(process, lambda: job(1) is not None and epoch_checkpoint_written(job(1), 1)())
    first, second = job(0), job(1)
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists() and job(2) is None
    finished = (first / "metrics.json").read_bytes(), os.stat(first / "metrics.json").st_mtime_ns
    first_events = sorted((first / "tensorboard").glob("events.*"))
    second_events = set((second / "tensorboard").glob("events.*"))

    done = subprocess.run(command(root, *sweep, "ckpt_path=last"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    jobs = sorted(root.glob("multirun/*/*/[0-9]_*"))
    assert [j.name[0] for j in jobs] == ["0", "1", "2"], "the same sweep folder, no new one"
    assert ((first / "metrics.json").read_bytes(), os.stat(first / "metrics.json").st_mtime_ns) == finished
    assert sorted((first / "tensorboard").glob("events.*")) == first_events, "the finished job was not trained again"
    assert f"Already finished, skipped: {first / 'metrics.json'}" in done.stdout
    resumed_steps = []
    for file in set((second / "tensorboard").glob("events.*")) - second_events:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            resumed_steps += [e.step for e in events.Scalars("train/loss")]
    assert sorted(resumed_steps) == list(range(STEPS, 2 * STEPS)), "job 2 resumed at its second epoch"
    assert loss_steps(second) == list(range(2 * STEPS))
    for folder in jobs:
        assert metrics(folder)["global_step"] == 2 * STEPS
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "table.py"), str(jobs[0].parent)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "n=3" in table.stdout and "unfinished" not in table.stdout, table.stdout


@pytest.mark.slow
@pytest.mark.mnist
def test_the_same_seed_gives_bit_identical_metrics(tmp_path, tiny_run):
    overrides = ["+experiment=mnist_tps", *tiny_run, "trainer.max_epochs=2", "model.loc_net.weights=null"]
    first, second = tmp_path / "first", tmp_path / "second"
    run(first, *overrides)
    run(second, *overrides)
    (a,), (b,) = run_folders(first), run_folders(second)
    assert metrics(a)["metrics"] == metrics(b)["metrics"]


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", lambda obj, file: (file.write(b"half a checkpoint"), killed()))
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    checkpoint = io.load_checkpoint(path)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(3))
