"""Sweeps and scale-out: multirun through the real script, the paper-table sweep, Optuna, DDP, SLURM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stn.run_folders import job_folder_name, sweep_dir

REPO = Path(__file__).resolve().parents[1]


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``scripts/train.py`` from an empty working folder, writing below ``tmp_path/outputs``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "scripts" / "train.py"), *overrides, f"paths.output_root={tmp_path / 'outputs'}"]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert list(cwd.iterdir()) == [], f"train.py wrote into its working folder: {list(cwd.iterdir())}"
    return done


def job_folders(tmp_path: Path) -> list[Path]:
    return sorted(path.parent for path in (tmp_path / "outputs").rglob(".hydra"))


def scalar_tags(run: Path) -> set[str]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"])


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.slow
@pytest.mark.mnist
def test_multirun_keeps_every_job_and_the_table_reads_them(tmp_path, tiny_run):
    """Three jobs, one of which fails (a 1-row grid is impossible): the other two still finish. The job
    folders are named by their overrides, shortened past 120 characters: tiny_run's pose-split settings
    are left out so that the swept rows stay in the name (the jobs measure the default split)."""
    overrides = [override for override in tiny_run if not override.startswith("callbacks.pose_split.")]
    done = train(tmp_path, "-m", "+experiment=mnist_tps", "model.tps.rows=1,3,4", *overrides)
    assert done.returncode != 0, "the sweep must report its failed job"
    jobs = job_folders(tmp_path)
    assert len(jobs) == 3
    for number, (job, rows) in enumerate(zip(jobs, (1, 3, 4))):
        assert job.name.startswith(f"{number}_+experiment=mnist_tps,") and f",rows={rows}," in job.name, job.name
    assert all(job.parent.parent.parent.name == "multirun" for job in jobs)
    failed, *finished = jobs
    assert not (failed / "metrics.json").exists()
    assert "model.tps.rows" in (failed / "error.txt").read_text()
    for job, rows in zip(finished, (3, 4)):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["config"]["model"]["tps"]["rows"] == rows
        assert {"train/loss", "val/acc", "test/acc", "test/error"} <= scalar_tags(job)

    table = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "table.py"), str(jobs[0].parent)], capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    errors, poses = table.stdout.split("Distortion left")
    rows = {line.split("|")[1].strip(): line for line in errors.splitlines() if line.startswith("|")}
    pose_rows = {line.split("|")[1].strip(): line for line in poses.splitlines() if line.startswith("|")}
    for job, variant in zip(finished, ("model.tps.rows=3", "model.tps.rows=4")):
        metrics = json.loads((job / "metrics.json").read_text())["metrics"]
        label = f"ST-CNN TPS (ours, {variant})"  # one stage: no chain in the label
        assert f"{metrics['test/error']:.2f} (n=1)" in rows[label]
        pose = [f"{metrics[f'test/pose/{key}_left']:.2f}" for key in ("angle", "log_scale", "shift")]
        within = [f"{metrics[f'test/pose_split/{key}_within_left']:.2f}" for key in ("angle", "log_scale", "shift")]
        assert " / ".join(pose) + ", within a digit " + " / ".join(within) + " (n=1)" in pose_rows[label]
    assert "failed (1 of 1)" in rows["ST-CNN TPS (ours, model.tps.rows=1)"]
    assert f"- {failed}: SettingError: A TPS control-point grid needs at least 2 rows" in table.stdout


@pytest.mark.slow
@pytest.mark.mnist
def test_ddp_trains_with_two_processes_into_one_run_folder(tmp_path, tiny_run):
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    assert train(single, "+experiment=mnist_tps", *tiny_run).returncode == 0
    done = train(ddp, "+experiment=mnist_tps", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *tiny_run)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "MEMBER: 2/2" in done.stdout + done.stderr

    (single_run,), (ddp_run,) = job_folders(single), job_folders(ddp)
    single_metrics = json.loads((single_run / "metrics.json").read_text())
    ddp_metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert (single_metrics["world_size"], ddp_metrics["world_size"]) == (1, 2)
    assert single_metrics["metrics"].keys() == ddp_metrics["metrics"].keys()
    assert scalar_tags(single_run) == scalar_tags(ddp_run)

    def files(run: Path) -> set[str]:
        return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "tfevents" not in p.name and p.suffix != ".log"}

    assert files(single_run) == files(ddp_run)
    single_state = torch.load(single_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ddp_state = torch.load(ddp_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {k: v.shape for k, v in single_state.items()} == {k: v.shape for k, v in ddp_state.items()}


@pytest.mark.slow
@pytest.mark.mnist
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, tiny_run):
    done = train(tmp_path, "-m", "+experiment=mnist_tps", "+hparams_search=mnist_optuna", "hydra.sweeper.n_trials=2", *tiny_run)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    jobs = job_folders(tmp_path)
    assert len(jobs) == 2
    best = OmegaConf.load(jobs[0].parent / "optimization_results.yaml")
    trials = [json.loads((job / "metrics.json").read_text())["metrics"]["val/acc_best"] for job in jobs]
    assert best.best_value == pytest.approx(max(trials))
    assert set(best.best_params) == {"model.optimizer.lr", "model.optimizer.weight_decay", "model.loc_net.lr_mult", "model.bending_weight"}


def test_job_folder_names_stay_legal():
    assert job_folder_name("model.tps.rows=3,seed=2") == "model.tps.rows=3,seed=2"
    many = ",".join(f"trainer.limit_train_batches_{i}=3" for i in range(5))
    assert len(many) > 120
    assert job_folder_name(many) == ",".join(f"limit_train_batches_{i}=3" for i in range(5))
    name = job_folder_name(",".join(f"model.loc_net.some_long_setting_{i}=value_{i}" for i in range(20)))
    assert len(name) == 120 and name.startswith("some_long_setting_0=value_0,")


def test_ckpt_path_last_finds_a_sweep_whose_values_come_from_its_sweep_config(tmp_path):
    """``+sweep=paper_table`` sets what is swept in ``hydra.sweeper.params``, not on the command line: a job of
    the re-run sweep (its overrides: the params' values, then the command line's) finds the sweep's folder
    as the sweep itself does (before, each job of such a sweep started a new folder)."""
    folder = tmp_path / "multirun" / "2026-12-05" / "10-06-12"
    folder.mkdir(parents=True)
    task = ["+sweep=paper_table", "data.distortion=r,p,e", "seed=1", "ckpt_path=last"]
    params = {"+experiment": "mnist_cnn,mnist_affine,mnist_tps", "data.distortion": "r,rts,p,e", "seed": "1,2,3"}
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}}))
    fresh, root = str(tmp_path / "fresh"), str(tmp_path)
    assert sweep_dir("last", fresh, root, task) == str(folder)
    job = ["+experiment=mnist_affine", "data.distortion=p", "seed=1", "+sweep=paper_table", "ckpt_path=last"]
    assert sweep_dir("last", fresh, root, job) == str(folder)
    assert sweep_dir("last", fresh, root, [*job[:1], "data.distortion=rts", *job[2:]]) == fresh  # not a job of it
    assert sweep_dir(None, fresh, root, job) == fresh


def test_paper_table_sweep_composes_36_jobs():
    cfg = compose_train("+sweep=paper_table")
    params = cfg.hydra.sweeper.params
    assert params["+experiment"] == "mnist_cnn,mnist_affine,mnist_tps"
    assert params["data.distortion"] == "r,rts,p,e"
    assert params["seed"] == "1,2,3"
    for experiment, transform in (("mnist_cnn", "none"), ("mnist_affine", "affine"), ("mnist_tps", "tps")):
        job = compose_train(f"+experiment={experiment}", "data.distortion=p", "seed=2")
        assert (job.model.transform, job.data.distortion, job.seed) == (transform, "p", 2)
        # every model, one schedule: a clean epoch, then the distortion grows over four
        assert (job.data.clean_epochs, job.data.growth_epochs, job.model.classifier.pool) == (1, 4, "flat")


@pytest.mark.parametrize("experiment", sorted(path.stem for path in (REPO / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_builds_its_model(experiment):
    """Each experiment's model config instantiates (random loc-net weights: no pose file or download), e.g. the
    CNN, which inherits mnist_tps's schedule but has no transformer stage to start."""
    cfg = compose_train(f"+experiment={experiment}", "model.loc_net.weights=null")
    model = instantiate(cfg.model)
    transform = cfg.model.transform
    stages = 0 if transform == "none" else 1 if isinstance(transform, str) else len(transform)
    assert len(model.transformer.loc_nets) == stages


def assert_only_differ_in(base, other, *settings: str) -> None:
    """The composed configs ``base`` and ``other`` agree on every run setting but the dotted ``settings``."""
    base, other = (OmegaConf.to_container(cfg, resolve=False) for cfg in (base, other))
    for setting in settings:
        *parents, key = setting.split(".")
        for cfg in (base, other):
            for parent in parents:
                cfg = cfg[parent]
            del cfg[key]
    for group in ("data", "model", "trainer", "callbacks", "pose_pretraining"):
        assert other[group] == base[group], group


def test_the_main_job_reads_the_canvas_through_a_frozen_pose_pretrained_resnet18_in_native_precision():
    """One TPS stage; resnet18 at layer2 on the full 42x42 canvas with a normalised head, its backbone
    pose-pretrained (16 epochs at 3x the rate, channels-last) and frozen, pretext and reader in the precision
    the machine computes natively (auto)."""
    main = compose_train("+experiment=mnist_tps")
    assert (main.model.transform, main.model.stage_start, main.model.freeze_classifier) == ("tps", None, [1, 5])
    reader = {"backbone": "resnet18", "feature_node": "layer2", "input_size": 42, "head_norm": True,
              "backbone_dtype": "auto", "weights": "pose", "freeze_backbone": True}
    assert {key: main.model.loc_net[key] for key in reader} == reader
    pretext = {"epochs": 16, "lr": 0.003, "backbone_dtype": "auto", "channels_last": True}
    assert {key: main.pose_pretraining[key] for key in pretext} == pretext
    assert compose_train().pose_pretraining.channels_last is False  # the pretext's own default, as model.channels_last


def test_the_affine_experiment_is_mnist_tps_with_an_affine_stage_and_an_earlier_thaw():
    base, affine = compose_train("+experiment=mnist_tps"), compose_train("+experiment=mnist_affine")
    assert affine.model.transform == "affine"
    assert list(affine.model.freeze_classifier) == [1, 3]
    assert_only_differ_in(base, affine, "model.transform", "model.freeze_classifier")


def test_the_resnet18_experiment_is_mnist_tps_in_two_composed_stages():
    """The main job's reader in a similarity stage and a TPS stage that reads its view without a gradient and
    joins at the thaw; everything else is mnist_tps's, the pose file included."""
    base, two = compose_train("+experiment=mnist_tps"), compose_train("+experiment=mnist_tps_resnet18")
    assert list(two.model.transform) == ["similarity", "tps"] and list(two.model.stage_start) == [0, 5]
    assert two.model.stage_start[1] == two.model.freeze_classifier[1]  # the TPS joins when the classifier thaws
    assert two.model.detach_views is True
    assert_only_differ_in(base, two, "model.transform", "model.stage_start", "model.detach_views")


def test_the_shufflenet_experiment_is_the_earlier_main_job():
    """mnist_tps until 2026-12-06 evening: composed stages on frozen, pose-pretrained shufflenet loc-nets on a
    32x32 view, the pretext at its defaults (10 epochs, float32, contiguous)."""
    base, shuffle = compose_train("+experiment=mnist_tps"), compose_train("+experiment=mnist_tps_shufflenet")
    assert list(shuffle.model.transform) == ["similarity", "tps"] and list(shuffle.model.stage_start) == [0, 5]
    assert shuffle.model.detach_views is True
    reader = {"backbone": "shufflenet_v2_x0_5", "feature_node": "stage2", "input_size": 32, "head_norm": False,
              "backbone_dtype": "float32"}
    assert {key: shuffle.model.loc_net[key] for key in reader} == reader
    assert (shuffle.model.loc_net.weights, shuffle.model.loc_net.freeze_backbone) == ("pose", True)
    defaults = compose_train().pose_pretraining
    pretext = ("epochs", "lr", "channels_last")
    assert {key: shuffle.pose_pretraining[key] for key in pretext} == {key: defaults[key] for key in pretext}
    assert (shuffle.pose_pretraining.backbone_dtype, defaults.backbone_dtype) == ("float32", "auto")
    assert_only_differ_in(base, shuffle, "model.transform", "model.stage_start", "model.detach_views",
                          *(f"model.loc_net.{key}" for key in reader), *(f"pose_pretraining.{key}" for key in (*pretext, "backbone_dtype")))


def test_the_r_experiment_is_the_shufflenet_recipe_on_r_with_learning_resnet18_loc_nets():
    base, r = compose_train("+experiment=mnist_tps_shufflenet"), compose_train("+experiment=mnist_tps_r")
    assert (r.data.distortion, list(r.model.stage_start)) == ("r", [0, 5])
    assert r.model.stage_start[1] == r.model.freeze_classifier[1]  # the TPS joins when the classifier thaws
    changed = {"backbone": "resnet18", "feature_node": "layer1", "head_norm": True}
    assert {key: r.model.loc_net[key] for key in changed} == changed
    assert r.model.loc_net.input_size == 32
    assert r.model.loc_net.weights == "DEFAULT"  # measured from random initialisation offline, not pose-pretrained
    assert (r.model.loc_net.freeze_backbone, r.model.detach_views) == (False, False)  # learning, as measured
    assert_only_differ_in(base, r, "data.distortion", "model.detach_views", "model.loc_net.weights",
                          "model.loc_net.freeze_backbone", *(f"model.loc_net.{key}" for key in changed))


def test_slurm_launcher_composes_and_writes_its_sbatch_script(tmp_path, monkeypatch):
    """The launcher config composes, instantiates, and submitit turns it into the sbatch header.

    No cluster here: submitit is told ``srun`` exists, and the submission file is written, not sent.
    """
    cfg = compose_train(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=90", "trainer=ddp", f"hydra.sweep.dir={tmp_path}",
    )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher_cfg.partition, launcher_cfg.gpus_per_node, launcher_cfg.tasks_per_node) == ("gpu", 4, 4)
    assert (launcher_cfg.timeout_min, cfg.trainer.strategy) == (90, "ddp_find_unused_parameters_true")

    launcher = instantiate(launcher_cfg)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    params = dict(launcher.params)
    init = {"folder": str(tmp_path / ".submitit"), "slurm_max_num_timeout": params.pop("max_num_timeout")}
    del params["submitit_folder"]
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    shared = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name", "stderr_to_stdout"}
    executor.update_parameters(**{key if key in shared else f"slurm_{key}": value for key, value in params.items()})
    script = executor._executor._make_submission_file_text("python scripts/train.py", "job")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=90", "--nodes=1", "--mem=32GB"):
        assert f"#SBATCH {line}" in script


@pytest.mark.slow
@pytest.mark.mnist
def test_parallel_launcher_runs_jobs_at_once_in_their_own_folders(tmp_path, tiny_run):
    """hydra/launcher=parallel: two jobs in two worker processes, each with its own run folder and results."""
    done = train(tmp_path, "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "+experiment=mnist_cnn",
                 "seed=1,2", *tiny_run)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    jobs = job_folders(tmp_path)
    assert len(jobs) == 2 and len({job.parent for job in jobs}) == 1, jobs
    seeds = sorted(json.loads((job / "metrics.json").read_text())["config"]["seed"] for job in jobs)
    assert seeds == [1, 2]
    assert all("test/error" in scalar_tags(job) for job in jobs)
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
