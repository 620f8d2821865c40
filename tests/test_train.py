"""End to end: the real scripts in subprocesses, on real MNIST, with tiny limits.

Every run writes into its own ``paths.output_root`` under ``tmp_path`` and runs from an empty working
directory, which must stay empty. Needs ``$STN_DATA_DIR`` holding ``MNIST/raw`` (skipped otherwise).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import save_image

from stn.data.mnist_files import read_split
from stn.module import STNClassifier
from stn.pose_split import pose_split
from stn.pose_weights import pose_weights_file
from stn.precision import resolve_backbone_dtype

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.mnist]

STEPS_PER_EPOCH = 3  # trainer.limit_train_batches of the tiny_run overrides (tests/conftest.py)


def run_script(script: str, tmp_path: Path, name: str, *overrides: str, env: dict | None = None) -> tuple[Path, str]:
    """Run ``scripts/<script>`` from an empty folder; return its run folder and its output."""
    cwd = tmp_path / f"{name}_cwd"
    cwd.mkdir()
    root = tmp_path / name
    command = [sys.executable, str(REPO / "scripts" / script), f"paths.output_root={root}", *overrides]
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert list(cwd.iterdir()) == [], f"{script} wrote into its working directory: {list(cwd.iterdir())}"
    runs = [p.parent for p in root.glob("*/*/.hydra")]
    assert len(runs) == 1, runs
    assert f"Run folder: {runs[0]}" in output
    return runs[0], output


def read_gray(path: Path) -> torch.Tensor:
    """A PNG as float ``(1, H, W)`` in [0, 1]."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("L")).float() / 255


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def retested_error(checkpoint: str | Path, data: dict, test_batches: int | None, device: str = "cpu",
                   bf16: bool = False) -> float:
    """test/error recomputed without Lightning: the checkpoint's model in evaluation mode over the first
    ``test_batches`` batches (``None``: all) of the test loader of a data module built from ``data`` (a run's
    ``config["data"]``), the share of wrong argmax predictions in percent; ``bf16`` under bfloat16 autocast,
    as ``trainer.precision=bf16-mixed`` tests."""
    model = STNClassifier.from_checkpoint(str(checkpoint)).eval().to(device)
    datamodule = instantiate(data)
    datamodule.setup("test")
    wrong = seen = 0
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        for images, labels, *_ in itertools.islice(datamodule.test_dataloader(), test_batches):
            wrong += int((model(images.to(device)).argmax(1).cpu() != labels).sum())
            seen += labels.numel()
    assert seen > 0
    return 100.0 * wrong / seen


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def tps_run(tmp_path_factory, tiny_run) -> Path:
    """Two tiny epochs of the two-stage TPS experiment (similarity, then TPS), keeping every epoch's checkpoint;
    test images from eval seed 3."""
    run, _ = run_script(
        "train.py", tmp_path_factory.mktemp("tps"), "tps", "+experiment=mnist_tps_resnet18", *tiny_run,
        "trainer.max_epochs=2", "model.loc_net.weights=null", "callbacks.model_checkpoint.save_top_k=-1",
        "data.eval_seed=3",
    )
    return run


def test_tps_run_writes_metrics_checkpoints_and_no_stray_files(tps_run):
    summary = read_metrics(tps_run)
    metrics = summary["metrics"]
    pose = {f"{split}/pose/{name}{suffix}" for split in ("val", "test") for name in ("angle", "log_scale", "shift")
            for suffix in ("", "_identity", "_left")}
    pose |= {f"{split}/pose/residual{suffix}" for split in ("val", "test") for suffix in ("", "_identity")}
    pose |= {f"{split}/pose/angle_{name}" for split in ("val", "test") for name in ("slope", "scatter")}
    pose |= {f"{split}/pose/lost" for split in ("val", "test")}
    pose |= {f"{split}/pose/stage1/{name}_left" for split in ("val", "test") for name in ("angle", "log_scale", "shift")}
    split = {f"test/pose_split/{name}_{part}" for name in ("angle", "log_scale", "shift")
             for part in ("drawn", "within", "between", "within_left", "between_left")}
    split |= {f"test/pose_split/{name}" for name in ("digits", "draws", "lost", "angle_within_slope", "angle_slant_r",
                                                     "slant_upright", "slant_after", "angle_abs_median",
                                                     "angle_abs_median_drawn", "angle_over_30")}
    assert set(metrics) == {"val/acc", "val/acc_best", "val/loss", "test/acc", "test/error", "test/loss"} | pose | split
    # rts: the identity leaves the whole spread (about 26° of angle), no non-similar residual
    assert 20 < metrics["test/pose/angle_identity"] < 32 and metrics["test/pose/residual_identity"] < 1e-4
    assert metrics["test/error"] == pytest.approx(100 * (1 - metrics["test/acc"]), abs=1e-4)
    # the best checkpoint was tested: a plain loop over the run's 2 test batches scores it the same
    assert metrics["test/error"] == pytest.approx(
        retested_error(summary["best_checkpoint"], summary["config"]["data"], 2), abs=1e-6)
    assert metrics["val/acc_best"] >= metrics["val/acc"]
    config = summary["config"]
    assert config["model"]["transform"] == ["similarity", "tps"] and config["data"]["distortion"] == "rts"
    assert config["model"]["classifier"]["pool"] == "flat"
    assert (config["data"]["clean_epochs"], config["data"]["growth_epochs"]) == (1, 4)
    assert config["model"]["freeze_classifier"] == [1, 5]
    assert config["seed"] == 12345 and config["ckpt_path"] is None
    assert config["model"]["tps"] == {"rows": 4, "cols": 4, "margin": 0.0}
    assert config["model"]["detach_views"] is True  # the recipe's; the checkpoint rebuilds a transformer that detaches
    assert STNClassifier.from_checkpoint(summary["best_checkpoint"]).transformer.detach_views
    assert summary["pretrained"] is False
    assert summary["epochs"] == 2 and summary["global_step"] == 2 * STEPS_PER_EPOCH
    checkpoints = tps_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000.ckpt", "epoch_001.ckpt", "last.ckpt"]
    assert Path(summary["best_checkpoint"]).parent == checkpoints
    assert not list(tps_run.parents[2].rglob("lightning_logs")) and not (REPO / "lightning_logs").exists()


def test_tensorboard_holds_scalars_images_and_hparams(tps_run):
    tensorboard = events(tps_run)
    tags = tensorboard.Tags()
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "test/error"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    lr_tags = [t for t in tags["scalars"] if t.startswith("lr-")]
    assert {t.split("/")[-1] for t in lr_tags} == {"classifier", "loc_head"}  # the recipe's backbones are frozen
    assert len(tensorboard.Scalars("train/loss")) == 2 * STEPS_PER_EPOCH
    assert len(tensorboard.Scalars("val/acc")) == 2
    test_error = tensorboard.Scalars("test/error")[-1].value
    assert test_error == pytest.approx(read_metrics(tps_run)["metrics"]["test/error"], abs=1e-4)
    # what the transformer learned, per validation and at test, as in metrics.json
    metrics = read_metrics(tps_run)["metrics"]
    for tag in ("val/pose/angle_left", "val/pose/shift_left", "val/pose/log_scale_left", "test/pose/angle_left",
                "val/pose/angle_slope", "test/pose/angle_scatter", "val/pose/stage1/angle_left",
                "test/pose/stage1/shift_left"):
        assert tensorboard.Scalars(tag)[-1].value == pytest.approx(metrics[tag], rel=1e-5), tag
    assert len(tensorboard.Scalars("val/pose/angle_left")) == 2  # once per epoch
    # loc-net health of both stages, once per epoch
    for stage in (1, 2):
        for name in ("param_std", "dead_units"):
            values = [event.value for event in tensorboard.Scalars(f"loc/stage{stage}/{name}")]
            assert len(values) == 2 and all(0 <= value <= (1 if name == "dead_units" else 10) for value in values)
    # 4 images in one row with 2 px padding, all upscaled 4x: 42x42 inputs, 28x28 warped outputs
    sizes = {"input": (4 * 170 + 2, 172), "warped": (4 * 114 + 2, 116),
             "control_points": (4 * 170 + 2, 172), "mesh": (4 * 170 + 2, 172)}
    for name, size in sizes.items():
        logged = tensorboard.Images(f"images/{name}")
        assert [event.step for event in logged] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], name  # every epoch
        assert (logged[0].width, logged[0].height) == size, name
    hparams = tensorboard.summary_metadata  # plugin metadata of every tag
    assert any(meta.plugin_data.plugin_name == "hparams" for meta in hparams.values())


def test_the_pose_split_at_test_is_that_of_the_tested_checkpoint(tps_run, mnist_root):
    """callbacks.pose_split: the split of the best checkpoint's transformer on 40 test digits x 3 draws
    (tiny_run), computed again here, in metrics.json and in TensorBoard."""
    summary = read_metrics(tps_run)
    model = STNClassifier.from_checkpoint(summary["best_checkpoint"]).eval()
    upright = read_split(Path(mnist_root), train=False)[0][:40]
    expected = pose_split(model.transformer, upright, "rts", [1000, 1001, 1002], batch_size=500)
    assert expected["draws"] == 3 and 0 < expected["angle_within_left"]
    tensorboard = events(tps_run)
    for name, value in expected.items():
        assert summary["metrics"][f"test/pose_split/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert tensorboard.Scalars(f"test/pose_split/{name}")[-1].value == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_checkpoint_reloads_in_a_new_process_with_the_same_test_metric(tps_run, tmp_path):
    trained = read_metrics(tps_run)
    run, _ = run_script(
        "eval.py", tmp_path, "eval", f"ckpt_path={trained['best_checkpoint']}",
        "data.batch_size=32", "trainer.limit_test_batches=2", "callbacks.pose_split.digits=40", "callbacks.pose_split.draws=3",
    )
    evaluated = read_metrics(run)
    assert evaluated["metrics"]["test/pose_split/angle_within_left"] == pytest.approx(
        trained["metrics"]["test/pose_split/angle_within_left"], rel=1e-5)  # the same split, printed by eval.py too
    assert evaluated["config"]["data"]["distortion"] == "rts"
    assert evaluated["config"]["data"]["eval_seed"] == 3  # the checkpoint's test images, not the default seed
    for key in ("test/acc", "test/error", "test/loss"):
        assert evaluated["metrics"][key] == pytest.approx(trained["metrics"][key], abs=1e-6), key
    assert "test/error" in events(run).Tags()["scalars"]


def test_eval_on_another_distortion(tps_run, tmp_path):
    """The checkpoint re-tested on E scores what a plain loop over the first test batch of E (eval seed 3, the
    checkpoint's) scores with the same weights."""
    checkpoint = tps_run / "checkpoints" / "last.ckpt"
    run, _ = run_script(
        "eval.py", tmp_path, "eval_e", f"ckpt_path={checkpoint}",
        "data.distortion=e", "data.batch_size=32", "trainer.limit_test_batches=1", "callbacks.pose_split.digits=20",
        "callbacks.pose_split.draws=2",
    )
    evaluated = read_metrics(run)
    data = evaluated["config"]["data"]
    assert (data["distortion"], data["eval_seed"], data["batch_size"]) == ("e", 3, 32)
    assert evaluated["metrics"]["test/error"] == pytest.approx(retested_error(checkpoint, data, 1), abs=1e-6)
    assert evaluated["metrics"]["test/pose_split/draws"] == 2  # split on the distortion tested


def test_pose_split_writes_what_the_split_of_the_checkpoints_transformer_is(tps_run, tmp_path, mnist_root):
    checkpoint = tps_run / "checkpoints" / "last.ckpt"
    run, output = run_script(
        "pose_split.py", tmp_path, "pose_split", f"ckpt_path={checkpoint}", "digits=40", "draws=3", "seed=7",
        "batch_size=16",
    )
    written = json.loads((run / "pose_split.json").read_text())
    assert written["distortion"] == "rts" and written["seeds"] == [7, 8, 9]
    model = STNClassifier.from_checkpoint(str(checkpoint)).eval()
    upright, labels = (part[:40] for part in read_split(Path(mnist_root), train=False))
    expected = pose_split(model.transformer, upright, "rts", [7, 8, 9], batch_size=16, labels=labels)
    assert written["split"].keys() == expected.keys()
    for name, value in expected.items():
        assert written["split"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert "| angle |" in output and f"{int(expected['digits'])} digits x 3 draws" in output
    label = int(labels[0])  # a class row per class of the 40 digits
    assert f"| {label} | {int(expected[f'class{label}/digits'])} | {expected[f'class{label}/angle_within_left']:.2f} |" in output


def test_resume_continues_from_the_saved_epoch(tps_run, tmp_path, tiny_run):
    first = tps_run / "checkpoints" / "epoch_000.ckpt"
    assert torch.load(first, map_location="cpu", weights_only=True)["global_step"] == STEPS_PER_EPOCH
    run, _ = run_script(
        "train.py", tmp_path, "resume", "+experiment=mnist_tps_resnet18", *tiny_run, "trainer.max_epochs=2",
        "model.loc_net.weights=null", f"ckpt_path={first}",
    )
    summary = read_metrics(run)
    assert summary["epochs"] == 2 and summary["global_step"] == 2 * STEPS_PER_EPOCH
    steps = [event.step for event in events(run).Scalars("train/loss")]
    assert steps == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))  # only the second epoch was trained
    assert [event.step for event in events(run).Scalars("val/acc")] == [2 * STEPS_PER_EPOCH - 1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_001.ckpt", "last.ckpt"]


def test_warp_writes_before_and_after_images(tps_run, tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    digits = torch.rand(2, 1, 42, 42, generator=torch.Generator().manual_seed(0))
    for i, digit in enumerate(digits):
        save_image(digit, folder / f"digit{i}.png")
    checkpoint = tps_run / "checkpoints" / "last.ckpt"
    run, output = run_script("warp.py", tmp_path, "warp", f"ckpt_path={checkpoint}", f"input={folder}")
    model = STNClassifier.from_checkpoint(str(checkpoint)).eval()
    # the PNGs hold uint8: compare with what the script read, warped as one batch as the script does (kernels may
    # round another batch size differently, which a bfloat16 backbone amplifies), up to the rounding of the output
    images = torch.stack([read_gray(folder / f"digit{i}.png") for i in range(2)])
    with torch.no_grad():
        expected = model.transformer(images)
    for i in range(2):
        before = read_gray(run / f"digit{i}_before.png")
        after = read_gray(run / f"digit{i}_after.png")
        torch.testing.assert_close(before, images[i], atol=1e-6, rtol=0)
        assert after.shape == (1, 28, 28)
        torch.testing.assert_close(after, expected[i], atol=0.5 / 255 + 1e-6, rtol=0)
        assert f"digit{i}.png: predicted class" in output


def test_affine_experiment_offline_falls_back_to_random_init(tmp_path, tiny_run):
    offline = {"TORCH_HOME": str(tmp_path / "torch_home"), "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    run, output = run_script(
        "train.py", tmp_path, "affine", "+experiment=mnist_affine", *tiny_run, "trainer.max_epochs=1",
        "model.loc_net.weights=DEFAULT", env=offline,
    )
    summary = read_metrics(run)
    assert summary["config"]["model"]["transform"] == "affine"
    assert summary["config"]["data"]["distortion"] == "rts"
    assert summary["pretrained"] is False
    assert "PRETRAINED WEIGHTS NOT LOADED" in output and "RANDOM initialisation" in output
    hparams = [meta for meta in events(run).summary_metadata.values() if meta.plugin_data.plugin_name == "hparams"]
    assert hparams and any(b"pretrained" in meta.plugin_data.content for meta in hparams)


def test_cnn_experiment_with_fast_dev_run(tmp_path):
    run, _ = run_script("train.py", tmp_path, "cnn", "+experiment=mnist_cnn", "data.batch_size=32", "+debug=fdr")
    summary = read_metrics(run)
    assert summary["config"]["model"]["transform"] == "none"
    assert summary["config"]["data"]["distortion"] == "rts"
    # fast_dev_run keeps no weights to re-test: the error is a count of wrong digits in its one test batch of 32
    wrong = summary["metrics"]["test/error"] / 100 * 32
    assert wrong == pytest.approx(round(wrong), abs=1e-4) and 0 <= round(wrong) <= 32
    assert summary["metrics"]["test/acc"] == pytest.approx(1 - round(wrong) / 32, abs=1e-6)
    assert summary["best_checkpoint"] is None and not list(run.rglob("*.ckpt"))
    assert not any(key.startswith("test/pose_split/") for key in summary["metrics"])  # no transformer, no split


def test_curriculum_chain_and_pooling_settings_through_the_script(tmp_path, tiny_run):
    """The levers of the recipes are config values: chain, pooling, curriculum, a loc-net per stage, when each
    stage starts learning; r has no shift to undo."""
    run, output = run_script(
        "train.py", tmp_path, "levers", "+experiment=mnist_tps", *tiny_run, "model.loc_net.weights=null",
        "model.loc_net.freeze_backbone=false",
        "data.distortion=r", "model.transform=[affine,tps]", "model.classifier.pool=gap",
        "data.clean_epochs=0.5", "data.growth_epochs=1", "model.output_size=null", "model.freeze_classifier=[0,2]",
        "model.loc_net.head_norm=true",
        "model.stage_loc_nets=[{backbone: mobilenet_v3_small, feature_node: features.2, lr_mult: 2.0},{}]",
        "trainer.max_epochs=2", "model.stage_start=[0,2]",
    )
    summary = read_metrics(run)
    config, metrics = summary["config"], summary["metrics"]
    assert config["model"]["transform"] == ["affine", "tps"] and config["model"]["classifier"]["pool"] == "gap"
    assert config["data"]["clean_epochs"] == 0.5 and config["data"]["growth_epochs"] == 1
    assert 40 < metrics["test/pose/angle_identity"] < 70  # U(-90°, 90°)
    assert "test/pose/angle_left" in metrics and "test/pose/shift_left" not in metrics
    tensorboard = events(run)
    assert "test/pose/angle_left" in tensorboard.Tags()["scalars"]
    state = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    tracked = [value for key, value in state.items() if key.startswith("classifier.") and key.endswith("num_batches_tracked")]
    assert tracked and all(int(count) == 0 for count in tracked), "the frozen classifier's batch norm saw no batch"
    norms = [key for key in state if key.startswith("transformer.stages.") and key.endswith("head.1.weight")]
    assert len(norms) == 2 and all(state[key].shape == (64,) for key in norms)  # a LayerNorm in each stage's head
    assert config["model"]["stage_loc_nets"] == [
        {"backbone": "mobilenet_v3_small", "feature_node": "features.2", "lr_mult": 2.0}, {}]
    rates = {tag.split("/", 1)[1]: [event.value for event in tensorboard.Scalars(tag)]
             for tag in tensorboard.Tags()["scalars"] if tag.startswith("lr-")}
    assert set(rates) == {"classifier", *(f"loc_{part}/stage{k}" for part in ("head", "backbone") for k in (1, 2))}
    for stage1, stage2 in zip(rates["loc_head/stage1"], rates["loc_head/stage2"], strict=True):  # lr_mult 2 against 1
        assert stage1 == pytest.approx(2 * stage2)
    assert "transformer.stages.0.loc_net.backbone.body.features.0.0.weight" in state  # mobilenet_v3_small's stem
    assert "transformer.stages.1.loc_net.backbone.body.conv1.weight" in state  # the recipe's resnet18
    # the TPS stage starts at epoch 2 of 2: held all run, it still maps its control points to themselves
    assert "model.stage_start=[0, 2] starts stage 1 at or after the run's end" in output
    assert not state["transformer.stages.1.loc_net.head.3.weight"].any()
    assert state["transformer.stages.0.loc_net.head.3.weight"].any()
    held = [value for key, value in state.items() if key.startswith("transformer.stages.1.") and key.endswith("num_batches_tracked")]
    assert held and all(int(count) == 0 for count in held), "the held loc-net's batch norm saw no batch"


@pytest.mark.parametrize(("task", "file"), [
    ("classes", "shufflenet_v2_x0_5_mnist.pth"), ("pose", "shufflenet_v2_x0_5_stage2_rts_pose.pth")])
def test_pretrained_loc_net_backbone_from_the_pretraining_script(tmp_path, tiny_run, task, file):
    """scripts/pretrain_loc_net.py writes weights that the training run loads as its loc-net backbone: a
    digit classifier's (task=classes) or a pose regressor's (task=pose, the backbone cut at stage2)."""
    pretrained, output = run_script(
        "pretrain_loc_net.py", tmp_path, "pretrain", "data.val_size=59800", "epochs=1", "input_size=16",
        "batch_size=50", f"task={task}",
    )
    weights = pretrained / file
    assert f"Backbone weights: {weights}" in output
    if task == "pose":
        task_name = r"pose pretraining shufflenet_v2_x0_5 at stage2 \((float32|bfloat16)\)"  # pretrain_loc_net's auto
        # the progress lines: the whole pretext's time from its first steps, then each epoch with the time left
        assert re.search(task_name + r": \d+ steps at \d+ ms a step on this machine \(its first steps\): about \d+ s in all",
                         output), output[-2000:]
        assert re.search(task_name + r": epoch 1/1, rms error / rms pose: angle \d\.\d{3}, log_scale \d\.\d{3}, "
                         r"shift_x \d\.\d{3}, shift_y \d\.\d{3}; \d+ s so far, about 0 s left", output), output[-2000:]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    run, _ = run_script(
        "train.py", tmp_path, "with_weights", "+experiment=mnist_tps_shufflenet", *tiny_run,
        f"model.loc_net.weights={weights}",
    )
    summary = read_metrics(run)
    assert summary["pretrained"] is True
    model = STNClassifier.from_checkpoint(summary["best_checkpoint"])
    first_conv = next(key for key in state if key.endswith("weight") and state[key].ndim == 4)
    # the first stage's backbone started from the file; after 3 steps it has moved only a little
    start = state[first_conv]
    trained = model.transformer.loc_nets[0].backbone.state_dict()
    loaded = next(value for key, value in trained.items() if key.endswith(first_conv))
    assert (loaded - start).abs().max() < 0.05 * start.abs().max()


def test_oracle_pose_run_logs_its_pose_error_and_the_floor(tmp_path, tiny_run):
    """model.oracle_pose through the real script: the transformer's distance from the exact inverse is
    logged every step, and the test pose spreads (the floor) are written like any run's."""
    run, _ = run_script(
        "train.py", tmp_path, "oracle", "+experiment=mnist_tps", *tiny_run, "model.oracle_pose=true",
        "trainer.limit_train_batches=5",
    )
    steps = [event.step for event in events(run).Scalars("train/pose_error")]
    values = [event.value for event in events(run).Scalars("train/pose_error")]
    assert len(steps) == 5 and all(math.isfinite(v) and v > 0 for v in values)
    metrics = read_metrics(run)["metrics"]
    assert read_metrics(run)["config"]["model"]["oracle_pose"] is True
    assert {"test/pose/angle_left", "test/pose/log_scale_left", "test/pose/shift_left"} <= metrics.keys()


def test_oracle_pose_warm_up_run_tells_the_pose_only_in_its_epochs(tmp_path, tiny_run):
    """model.oracle_pose=[1,2] through the real script: the pose error is logged in epoch 1's steps only
    (2 steps an epoch: global steps 2 and 3), and the range is kept in the run's config."""
    run, _ = run_script(
        "train.py", tmp_path, "warm_up", "+experiment=mnist_affine", *tiny_run, "model.oracle_pose=[1,2]",
        "trainer.max_epochs=3", "trainer.limit_train_batches=2", "model.freeze_classifier=null",
    )
    steps = [event.step for event in events(run).Scalars("train/pose_error")]
    assert steps == [2, 3]
    assert list(read_metrics(run)["config"]["model"]["oracle_pose"]) == [1, 2]


def assert_backbones_hold(model: STNClassifier, state: dict[str, torch.Tensor]) -> None:
    """Every loc-net backbone of ``model`` holds exactly the weights of the pose file ``state``."""
    for loc_net in model.transformer.loc_nets:
        trained = {key.removeprefix("body."): value for key, value in loc_net.backbone.state_dict().items()}
        assert trained and all(torch.equal(value, state[key]) for key, value in trained.items())


def test_main_job_pretrains_its_loc_net_backbone_once_and_keeps_it_frozen(tmp_path, tiny_run):
    """The main job's model.loc_net.weights=pose through the real script: the first run pretrains the resnet18
    backbone on training digits, in bfloat16 and channels-last, and caches it in paths.cache_dir under the name
    of every setting; the frozen stage holds exactly its (float32) weights after training, and reads in bfloat16
    after a checkpoint reload; a second run finds the file instead of pretraining again. The pretext follows the
    run's distortion (pose_pretraining.distortion=null): E draws no pose and reads the RTS file, R makes its own."""
    run, output = run_script("train.py", tmp_path, "pose", "+experiment=mnist_tps", *tiny_run)
    cached = list((tmp_path / "pose" / "cache").glob("*.pth"))
    summary = read_metrics(run)
    settings = {**summary["config"]["pose_pretraining"], "distortion": "rts"}
    native = resolve_backbone_dtype("auto", "cpu")
    assert settings["channels_last"] is True and settings["backbone_dtype"] == native
    assert summary["precision"]["pose_pretraining_backbone_dtype"] == summary["precision"]["loc_net_backbone_dtype"] == native
    assert cached == [pose_weights_file("resnet18", "layer2", (16, 16), settings, tmp_path / "pose" / "cache")]
    assert cached[0] != pose_weights_file("resnet18", "layer2", (16, 16), {**settings, "channels_last": False},
                                          tmp_path / "pose" / "cache")
    assert "pretraining resnet18 cut at layer2 on a 16x16 view to read the rts pose of 256 training digits" in output
    assert summary["pretrained"] is True and summary["config"]["model"]["loc_net"]["weights"] == "pose"
    assert summary["config"]["pose_pretraining"]["digits"] == 256
    state = torch.load(cached[0], map_location="cpu", weights_only=True)
    assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())
    model = STNClassifier.from_checkpoint(summary["last_checkpoint"])
    assert [loc_net.backbone_dtype for loc_net in model.transformer.loc_nets] == [native]
    assert_backbones_hold(model, state)
    cache_dir = f"paths.cache_dir={tmp_path / 'pose' / 'cache'}"
    _, output = run_script("train.py", tmp_path, "again", "+experiment=mnist_tps", *tiny_run, cache_dir, "data.distortion=e")
    assert "the cached pose-pretrained backbone" in output and "pretraining resnet18" not in output
    _, output = run_script("train.py", tmp_path, "turned", "+experiment=mnist_tps", *tiny_run, cache_dir, "data.distortion=r")
    assert "pretraining resnet18 cut at layer2 on a 16x16 view to read the r pose" in output
    assert sorted(path.name.split("_pose_")[0] for path in (tmp_path / "pose" / "cache").glob("*.pth")) == [
        "resnet18_layer2_16x16_r", "resnet18_layer2_16x16_rts"]


def test_the_two_stage_resnet18_recipe_reads_the_main_jobs_pose_file_in_both_stages(tmp_path, tiny_run):
    """mnist_tps_resnet18 through the real script, after the main job: it finds the main job's cached pose file
    (the same reader and pretext) instead of pretraining, and both frozen stages hold its weights and read in
    bfloat16 after a checkpoint reload."""
    cache_dir = f"paths.cache_dir={tmp_path / 'cache'}"
    run_script("train.py", tmp_path, "main", "+experiment=mnist_tps", *tiny_run, cache_dir)
    run, output = run_script("train.py", tmp_path, "resnet18", "+experiment=mnist_tps_resnet18", *tiny_run, cache_dir)
    assert "the cached pose-pretrained backbone" in output and "pretraining resnet18" not in output
    cached = list((tmp_path / "cache").glob("*.pth"))
    assert len(cached) == 1
    state = torch.load(cached[0], map_location="cpu", weights_only=True)
    summary = read_metrics(run)
    model = STNClassifier.from_checkpoint(summary["last_checkpoint"])
    assert [loc_net.backbone_dtype for loc_net in model.transformer.loc_nets] == [resolve_backbone_dtype("auto", "cpu")] * 2
    assert_backbones_hold(model, state)
    assert math.isfinite(summary["metrics"]["test/pose/angle_left"])


def test_bf16_and_compile_options_through_the_script_on_cpu(tmp_path, tiny_run):
    """The GPU path's options run on a CPU too: bf16 autocast, channels-last, torch.compile (aot_eager)."""
    run, output = run_script(
        "train.py", tmp_path, "fast", "+experiment=mnist_tps", *tiny_run, "trainer.precision=bf16-mixed",
        "model.channels_last=true", "model.compile={backend: aot_eager}",
    )
    summary = read_metrics(run)
    assert summary["config"]["trainer"]["precision"] == "bf16-mixed"
    assert summary["config"]["model"]["compile"] == {"backend": "aot_eager"}
    assert "networks compiled lazily" in (run / "train.log").read_text()
    # the best checkpoint re-tested eagerly under bf16 autocast, in a plain loop over the run's 2 test batches
    expected = retested_error(summary["best_checkpoint"], summary["config"]["data"], 2, bf16=True)
    assert summary["metrics"]["test/error"] == pytest.approx(expected, abs=1e-6)
    assert "test/pose/angle_left" in summary["metrics"]
    model = STNClassifier.from_checkpoint(summary["last_checkpoint"])  # compiled in place: plain keys
    assert model(torch.rand(2, 1, 42, 42)).shape == (2, 10)
