"""``scripts/bench.py train``: the step breakdown through the real script, read back from its JSON."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stn.step_profile import PHASES, profile_training_steps

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.mnist
def test_bench_train_splits_a_step_into_its_phases_and_writes_json(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "bench.py"), "train", "mnist_tps", "mnist_cnn", "--steps", "2",
               "--warmup", "1", "--override", "data.batch_size=8", "--override", "model.loc_net.input_size=16",
               "--output", str(tmp_path)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    wall_s = time.perf_counter() - start
    children_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10  # KiB on Linux
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["machine"]["threads"] >= 1 and report["overrides"] == ["data.batch_size=8", "model.loc_net.input_size=16"]
    train_s, rate_s, eval_s = 0.0, 0.0, 0.0
    for name in ("mnist_tps", "mnist_cnn"):
        result = report["results"][name]
        assert list(result["phases_ms"]) == list(PHASES) and all(ms >= 0 for ms in result["phases_ms"].values())
        assert result["batch_size"] == 8
        # the script's own peak resident set, at most the largest child's as the OS measured it from outside
        assert 0 < result["peak_memory_mb"] <= children_peak_mb
        # the 2 timed training steps (the median of 2 is their mean), from step_ms and from the rate, and the 2 timed
        # forward passes of a batch of 8
        train_s += 2 * result["step_ms"] / 1e3
        rate_s += 2 * 8 / result["train_images_per_s"]
        eval_s += 2 * 8 / result["eval_images_per_s"]
    # every timed step ran inside the process's wall time measured here, whichever figure times it
    assert 0 < max(train_s, rate_s) + eval_s < wall_s
    assert report["results"]["mnist_tps"]["phases_ms"]["loc-net"] > report["results"]["mnist_cnn"]["phases_ms"]["loc-net"]
    assert "| mnist_tps |" in done.stdout and "training throughput / mnist_cnn's" in done.stdout
    assert "RANDOM initialisation" not in done.stdout + done.stderr  # random weights stand in for pretrained ones
    assert report["results"]["mnist_tps"]["autocast"] is None


@pytest.mark.slow
@pytest.mark.mnist
def test_bench_train_runs_the_forward_pass_in_bf16_for_trainer_precision_bf16_mixed(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "bench.py"), "train", "mnist_cnn", "--steps", "2", "--warmup", "1",
               "--override", "data.batch_size=8", "--override", "trainer.precision=bf16-mixed", "--output", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "train.json").read_text())["results"]["mnist_cnn"]["autocast"] == "bfloat16"


def test_bench_loc_net_times_each_cut_against_the_first(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "bench.py"), "loc_net", "shufflenet_v2_x0_5:stage2:16",
               "resnet18:pooled", "--batch-size", "4", "--canvas", "20", "--warmup", "1", "--min-run-time", "0.01",
               "--backbone-dtype", "bfloat16"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ") for line in done.stdout.splitlines()
            if line.startswith("| shufflenet") or line.startswith("| resnet18")}
    assert set(rows) == {"shufflenet_v2_x0_5:stage2:16", "resnet18:pooled"}
    assert rows["shufflenet_v2_x0_5:stage2:16"][-1].strip() == "1.00x"
    assert rows["resnet18:pooled"][2].strip() == "512"  # resnet18's pooled features feed the head
    assert all(float(cell) > 0 for row in rows.values() for cell in row[3:6])  # frozen, learning, input with grad
    assert "backbone in bfloat16" in done.stdout


def test_the_experiments_take_turns_over_the_timed_steps():
    """``profile_training_steps``: every profile warms up first, then the timed steps go in turns, one
    profile after another, the steps shared out over the rounds (7 in 3 rounds: 3, 2, 2)."""
    calls = []

    class Profile:
        def __init__(self, name):
            self.name = name

        def run(self, steps, record=True):
            calls.append((self.name, steps, record))

        def result(self, eval_steps, eval_warmup):
            return (self.name, eval_steps, eval_warmup)

    results = profile_training_steps([Profile("a"), Profile("b")], steps=7, warmup=4, rounds=3)
    assert results == [("a", 7, 4), ("b", 7, 4)]
    assert calls == [("a", 4, False), ("b", 4, False), ("a", 3, True), ("b", 3, True), ("a", 2, True), ("b", 2, True),
                     ("a", 2, True), ("b", 2, True)]
