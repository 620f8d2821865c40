"""One clear paragraph per mistake: every row of the README's table through the real script.

Each mistake must exit non-zero with its paragraph (naming the setting and the fix) and no traceback,
and a mistake caught before training leaves no run folder behind. Bugs keep their tracebacks
(``HYDRA_FULL_ERROR=1`` shows one for a mistake too).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stn.checkpoints import load_checkpoint
from stn.errors import CorruptInputError, SettingError
from stn.module import STNClassifier

REPO = Path(__file__).resolve().parents[1]


def fails(tmp_path: Path, script: str, *overrides: str, env: dict | None = None) -> str:
    """Run ``scripts/<script>``; assert it failed with a paragraph and no traceback; return stderr."""
    root = tmp_path / "outputs"
    command = [sys.executable, str(REPO / "scripts" / script), f"paths.output_root={root}", *overrides]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode != 0, done.stdout[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    return done.stderr


def no_run_folder_left(tmp_path: Path) -> bool:
    return not list((tmp_path / "outputs").glob("*/*"))


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory, tiny_run) -> Path:
    """A real checkpoint of the classifier alone (two tiny epochs of mnist_cnn)."""
    root = tmp_path_factory.mktemp("cnn")
    command = [sys.executable, str(REPO / "scripts" / "train.py"), f"paths.output_root={root}", "+experiment=mnist_cnn",
               *tiny_run]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(root.glob("*/*/checkpoints/last.ckpt"))


TRAIN = ["+experiment=mnist_tps", "model.loc_net.weights=null", "callbacks.rich_progress_bar=null"]


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.parametrize(("overrides", "paragraph"), [
    (["+experiment=mnist_foo"], r"Could not find 'experiment/mnist_foo'.*mnist_tps"),
    ([*TRAIN, "model.loc_net.backbone=resnet1"], r"Unknown backbone 'resnet1'.*Set model\.loc_net\.backbone"),
    ([*TRAIN, "data.distortion=q"], r"Unknown MNIST distortion 'q'.*data\.distortion=rts"),
    ([*TRAIN, "model.optimizer._target_=torch.optim.Adamx"], r"model\.optimizer must name a torch\.optim\.optimizer\.Optimizer class .*'torch\.optim\.Adamx'"),
    ([*TRAIN, "model/scheduler=cosine", "+model.scheduler.pct_start=0.3"], r"model\.scheduler holds pct_start, which torch\.optim\.lr_scheduler\.CosineAnnealingLR does not take"),
    ([*TRAIN, "model.transform=tpss"], r"Unknown transform 'tpss'\. Set model\.transform"),
    ([*TRAIN, "model.tps.rows=1"], r"at least 2 rows and 2 columns, got rows=1.*model\.tps\.rows"),
    ([*TRAIN, "model.tps.margin=1.0"], r"margin must lie in \[0, 1\), got margin=1\.0.*model\.tps\.margin"),
    ([*TRAIN, "model.output_size=[0,28]"], r"model\.output_size must be \[H, W\].*got \[0, 28\]"),
    ([*TRAIN, "+callbacks.swa._target_=lightning.pytorch.callbacks.NoSuchCallback"],
     r"callbacks\.swa could not be built from _target_=lightning\.pytorch\.callbacks\.NoSuchCallback"),
    ([*TRAIN, "ckpt_path=/no/such/last.ckpt"], r"ckpt_path=/no/such/last\.ckpt does not exist"),
])
def test_a_setting_mistake_is_one_paragraph_and_leaves_no_run_folder(tmp_path, overrides, paragraph):
    stderr = fails(tmp_path, "train.py", *overrides)
    assert re.search(paragraph, stderr, flags=re.S), stderr[-3000:]
    assert no_run_folder_left(tmp_path)


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.parametrize(("overrides", "paragraph"), [
    (["task=rotation"], r"task='rotation' is not a pretraining task: set task=classes or task=pose"),
    (["task=pose", "distortion=p"], r"distortion='p' has no pose to pretrain on.*Set distortion=rts"),
])
def test_a_pretraining_mistake_is_one_paragraph_and_leaves_no_run_folder(tmp_path, overrides, paragraph):
    stderr = fails(tmp_path, "pretrain_loc_net.py", *overrides)
    assert re.search(paragraph, stderr, flags=re.S), stderr[-3000:]
    assert no_run_folder_left(tmp_path)


@pytest.mark.slow
@pytest.mark.mnist
def test_hydra_full_error_shows_the_traceback(tmp_path):
    root = tmp_path / "outputs"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), f"paths.output_root={root}", *TRAIN,
                           "data.distortion=q"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "SettingError: Unknown MNIST distortion" in done.stderr


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_damaged_mnist_files_name_the_file_and_the_fix(tmp_path, mnist_root, damage):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for file in Path(mnist_root, "MNIST", "raw").glob("*-ubyte"):
        shutil.copy(file, raw / file.name)
    if damage == "missing":
        (raw / "train-labels-idx1-ubyte").unlink()
    else:
        with (raw / "t10k-images-idx3-ubyte").open("r+b") as file:
            file.truncate(1000)
    offline = {"STN_DATA_DIR": str(tmp_path / "data"), "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    stderr = fails(tmp_path, "train.py", "+experiment=mnist_cnn", "+debug=limit", env=offline)
    expected = ("train-labels-idx1-ubyte" if damage == "missing" else "t10k-images-idx3-ubyte is truncated")
    assert expected in stderr and "STN_DATA_DIR" in stderr, stderr[-3000:]
    assert no_run_folder_left(tmp_path)


@pytest.mark.slow
@pytest.mark.mnist
def test_a_checkpoint_of_another_architecture_is_named(tmp_path, cnn_checkpoint):
    stderr = fails(tmp_path, "train.py", *TRAIN, f"ckpt_path={cnn_checkpoint}")
    assert f"{cnn_checkpoint} holds a model of another architecture" in stderr and "missing: transformer." in stderr
    assert no_run_folder_left(tmp_path)


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_a_truncated_or_corrupt_checkpoint_is_named(tmp_path, cnn_checkpoint, script):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(cnn_checkpoint.read_bytes()[:5000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for bad in (truncated, garbage):
        overrides = [*TRAIN, f"ckpt_path={bad}"] if script == "train.py" else [f"ckpt_path={bad}"]
        stderr = fails(tmp_path, script, *overrides)
        assert f"{bad} cannot be read as a checkpoint" in stderr, stderr[-3000:]
    assert no_run_folder_left(tmp_path)


@pytest.mark.slow
@pytest.mark.mnist
def test_a_nan_loss_stops_naming_the_step_the_setting_and_the_last_good_checkpoint(tmp_path):
    stderr = fails(tmp_path, "train.py", "+experiment=mnist_cnn", "+debug=limit", "trainer.max_epochs=3",
                   "trainer.limit_train_batches=5", "model.optimizer.lr=1e8", "callbacks.rich_progress_bar=null")
    assert "The training loss is nan at epoch" in stderr and "lower model.optimizer.lr (now 100000000.0)" in stderr
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert "DivergedError: The training loss is nan" in (run / "error.txt").read_text()
    saved = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else []
    if saved:  # it diverged after an epoch: that epoch's checkpoint is named, nothing later was saved
        assert f"The last good checkpoint is {run / 'checkpoints' / 'last.ckpt'}" in stderr
        assert all(load_checkpoint(run / "checkpoints" / name)["global_step"] % 5 == 0 for name in saved)
    else:
        assert "No checkpoint was saved before it." in stderr


@pytest.mark.slow
@pytest.mark.mnist
def test_warp_names_an_input_that_is_no_image(tmp_path, cnn_checkpoint):
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "seven.png").write_text("not a png")
    stderr = fails(tmp_path, "warp.py", f"ckpt_path={cnn_checkpoint}", f"input={folder}")
    assert f"{folder / 'seven.png'} cannot be read as an image" in stderr


@pytest.mark.slow
@pytest.mark.mnist
def test_pose_split_names_a_distortion_without_a_pose_and_too_few_draws(tmp_path, cnn_checkpoint):
    stderr = fails(tmp_path, "pose_split.py", f"ckpt_path={cnn_checkpoint}", "distortion=none")
    assert "distortion=none has no pose to split" in stderr and "Pass distortion= one of r, rts, p, e" in stderr
    stderr = fails(tmp_path, "pose_split.py", f"ckpt_path={cnn_checkpoint}", "draws=1")
    assert "draws=1, digits=2000" in stderr and "at least 2 of each" in stderr
    assert no_run_folder_left(tmp_path)


def test_wrong_image_shapes_or_channels_passed_to_the_model_are_named():
    model = STNClassifier(transform="none")
    for images in (torch.rand(1, 28, 28), torch.rand(2, 3, 28, 28), torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8)):
        with pytest.raises(SettingError, match=r"The model takes float images \(N, C, H, W\) with C = model\.in_channels = 1"):
            model(images)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["STN_PWNED"]),))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("STN_PWNED", str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, evil)
    with pytest.raises(CorruptInputError, match=r"never unpickled here \(torch\.load\(weights_only=True\)\)"):
        load_checkpoint(evil)
    with pytest.raises(CorruptInputError):
        STNClassifier.from_checkpoint(str(evil))
    assert not marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    calls = [(path, line) for path in [*REPO.glob("stn/**/*.py"), *REPO.glob("scripts/*.py")]
             for line in path.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls
