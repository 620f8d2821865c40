"""Distorted MNIST: file handling, the datamodule in a Trainer, and what each distortion does.

Real-MNIST tests read ``$STN_DATA_DIR/MNIST/raw`` and are skipped when it is not set. File-handling
tests write a tiny fake MNIST in torchvision's IDX layout. Warps are checked against scipy
(``ndimage``, ``RBFInterpolator``) and a numpy homography; distributions against image moments.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from PIL import Image
from scipy import ndimage
from scipy.interpolate import RBFInterpolator
from torchvision.datasets import MNIST

from stn.data import MNISTDataModule, MNISTFilesError
from stn.data import distortions as D
from stn.data.mnist import _TEST_STREAM
from stn.data.mnist_files import MNIST_FILES, REPO_ROOT



# ---------------------------------------------------------------- helpers


def read_idx(path: Path) -> np.ndarray:
    """An IDX file as numpy, parsed from the format description (independent of torchvision)."""
    data = path.read_bytes()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes())


def write_fake_mnist(root: Path, train: int = 300, test: int = 100) -> dict[str, np.ndarray]:
    """Random uint8 'digits' and balanced labels in ``root/MNIST/raw``; returns what was written."""
    rng = np.random.default_rng(0)
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    written = {}
    for split, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
        written[f"{split}_images"], written[f"{split}_labels"] = images, labels
    return written


def blobs(count: int, seed: int = 0) -> torch.Tensor:
    """Smooth float64 test images ``(count, 1, 28, 28)`` in [0, 1], zero near the border."""
    rng = np.random.default_rng(seed)
    images = ndimage.gaussian_filter(rng.random((count, 28, 28)), sigma=(0, 1.5, 1.5))
    images = (images - images.min()) / (images.max() - images.min())
    images[:, :5, :] = images[:, -5:, :] = images[:, :, :5] = images[:, :, -5:] = 0
    return torch.from_numpy(images)[:, None]


def moments(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Centre of mass (x, y pixels from the image centre), axis orientation and radius per image."""
    pictures = images[:, 0].double().numpy()
    height, width = pictures.shape[1:]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    xs, ys = xs - width / 2, ys - height / 2
    mass = pictures.sum((1, 2))
    cx = (pictures * xs).sum((1, 2)) / mass
    cy = (pictures * ys).sum((1, 2)) / mass
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    mu20 = (pictures * dx**2).sum((1, 2)) / mass
    mu02 = (pictures * dy**2).sum((1, 2)) / mass
    mu11 = (pictures * dx * dy).sum((1, 2)) / mass
    return {
        "centre": np.stack([cx, cy], 1),
        "orientation": 0.5 * np.arctan2(2 * mu11, mu20 - mu02),  # radians from +x towards +y (y down)
        "radius": np.sqrt(mu20 + mu02),
    }


def axis_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Difference of axis orientations, wrapped into [-pi/2, pi/2)."""
    return (a - b + np.pi / 2) % np.pi - np.pi / 2


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mnist_test_split(mnist_root):
    """The first 2000 real test digits, uint8 ``(2000, 1, 28, 28)``, and their labels, read with numpy."""
    raw = Path(mnist_root) / "MNIST" / "raw"
    images = read_idx(raw / "t10k-images-idx3-ubyte")[:2000]
    labels = read_idx(raw / "t10k-labels-idx1-ubyte")[:2000]
    return torch.from_numpy(images.copy())[:, None], labels


# ---------------------------------------------------------------- files, settings, errors


def test_fake_mnist_loads_and_splits(tmp_path):
    written = write_fake_mnist(tmp_path)
    datamodule = MNISTDataModule(root=tmp_path, val_size=50, batch_size=32)
    datamodule.prepare_data()
    datamodule.setup()
    train, val, test = datamodule.train_set, datamodule.val_set, datamodule.test_set
    assert (len(train), len(val), len(test)) == (250, 50, 100)
    assert train.images.dtype == torch.uint8 and train.images.shape == (250, 1, 28, 28)
    assert val.images.dtype == torch.float32 and test.labels.dtype == torch.int64
    # test images in file order, exactly /255; train + val is a partition of the training file
    assert torch.equal(test.images, torch.from_numpy(written["t10k_images"]).float()[:, None] / 255)
    assert np.array_equal(test.labels.numpy(), written["t10k_labels"])
    val_bytes = torch.round(val.images * 255).to(torch.uint8)
    rejoined = torch.cat([train.images, val_bytes])[:, 0].reshape(300, -1).numpy()
    original = written["train_images"].reshape(300, -1)
    assert sorted(map(bytes, rejoined)) == sorted(map(bytes, original))
    assert sorted(torch.cat([train.labels, val.labels]).tolist()) == sorted(written["train_labels"].tolist())
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_missing_files_offline_name_folder_files_and_fix(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n<urlopen error [Errno -3]>")

    monkeypatch.setattr(MNIST, "download", offline)
    root = tmp_path / "nowhere"
    datamodule = MNISTDataModule(root=root)
    with pytest.raises(MNISTFilesError) as caught:
        datamodule.prepare_data()
    message = str(caught.value)
    assert str(root / "MNIST" / "raw") in message and "downloading it failed" in message
    assert all(name in message for name in MNIST_FILES)
    assert "STN_DATA_DIR" in message and "data.root=" in message
    with pytest.raises(MNISTFilesError, match="missing train-images-idx3-ubyte, train-labels-idx1-ubyte"):
        datamodule.setup("fit")


def test_truncated_file_reports_name_and_sizes(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    expected = 16 + 300 * 28 * 28
    assert path.stat().st_size == expected
    path.write_bytes(path.read_bytes()[:-1000])
    datamodule = MNISTDataModule(root=tmp_path, val_size=50)
    for step in (datamodule.prepare_data, datamodule.setup):
        with pytest.raises(MNISTFilesError) as caught:
            step()
        message = str(caught.value)
        assert f"train-images-idx3-ubyte is truncated: expected {expected} bytes for 300 records, found {expected - 1000} bytes" in message
        assert "STN_DATA_DIR" in message


def test_corrupt_header_and_count_mismatch(tmp_path):
    write_fake_mnist(tmp_path)
    folder = tmp_path / "MNIST" / "raw"
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(MNISTFilesError, match="t10k-labels-idx1-ubyte is not an MNIST IDX file"):
        MNISTDataModule(root=tmp_path).prepare_data()
    write_idx(labels, np.zeros(99, dtype=np.uint8))
    with pytest.raises(MNISTFilesError, match="t10k has 100 images but 99 labels"):
        MNISTDataModule(root=tmp_path).prepare_data()


def test_root_defaults_to_env_then_repo_data(tmp_path, monkeypatch):
    monkeypatch.setenv("STN_DATA_DIR", str(tmp_path))
    assert MNISTDataModule().root == tmp_path
    assert MNISTDataModule(root=None).root == tmp_path
    monkeypatch.delenv("STN_DATA_DIR")
    assert MNISTDataModule().root == REPO_ROOT / "data"
    checkout = Path(__file__).resolve().parents[1]  # found from this file, not from the package's constant
    assert MNISTDataModule().root == checkout / "data"
    monkeypatch.setenv("PROJECT_ROOT", str(checkout))  # as the scripts set it
    paths = OmegaConf.create({"paths": OmegaConf.load(checkout / "configs" / "paths" / "default.yaml")}).paths
    assert Path(paths.data_dir) == MNISTDataModule().root  # the scripts' default folder (paths.data_dir) is the same


def test_bad_settings_name_setting_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown MNIST distortion 'rst'.*none, r, rts, p, e.*data.distortion=rts"):
        MNISTDataModule(distortion="rst")
    with pytest.raises(ValueError, match=r"data.batch_size must be an integer >= 1"):
        MNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"data.seed must be an integer >= 0"):
        MNISTDataModule(seed=-1)
    write_fake_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"data.val_size=300 leaves no training images.*holds 300"):
        MNISTDataModule(root=tmp_path, val_size=300).setup("fit")
    with pytest.raises(RuntimeError, match=r"call setup\(\) before train_dataloader"):
        MNISTDataModule(root=tmp_path).train_dataloader()
    with pytest.raises(ValueError, match=r"shape \(N, C, 28, 28\)"):
        D.distort(torch.zeros(2, 28, 28, dtype=torch.uint8), "r", generator())


def test_image_size_and_classes_known_before_setup():
    for name in D.DISTORTIONS:
        datamodule = MNISTDataModule(root="/nonexistent", distortion=name)
        assert datamodule.image_size == ((42, 42) if name == "rts" else (28, 28))
        assert datamodule.num_classes == 10


# ---------------------------------------------------------------- warps against independent references


def test_rotation_matches_scipy_rotate():
    images = blobs(6)
    angles = torch.tensor([-80.0, -45.0, -10.0, 0.0, 33.0, 90.0], dtype=torch.float64)
    warped = D.warp(images, "r", {"angle": torch.deg2rad(angles)})
    for image, angle, result in zip(images[:, 0].numpy(), angles.tolist(), warped[:, 0].numpy()):
        # scipy turns counter-clockwise as displayed for positive angles; ours turn clockwise
        expected = ndimage.rotate(image, -angle, reshape=False, order=1, mode="grid-constant")
        np.testing.assert_allclose(result, expected, atol=1e-9)


def test_rts_matches_scipy_affine_transform():
    images = blobs(5)
    params = D.sample_params("rts", 5, generator(3), dtype=torch.float64)
    warped = D.warp(images, "rts", params)
    assert warped.shape == (5, 1, 42, 42)
    for n in range(5):
        angle, scale = float(params["angle"][n]), float(params["scale"][n])
        shift_x, shift_y = params["shift"][n].tolist()
        # input (row, col) = M @ (output (row, col) + 0.5 - 21 - shift) + 14 - 0.5
        matrix = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) / scale
        offset = matrix @ np.array([0.5 - 21 - shift_y, 0.5 - 21 - shift_x]) + 13.5
        expected = ndimage.affine_transform(images[n, 0].numpy(), matrix, offset, output_shape=(42, 42), order=1, mode="grid-constant")
        np.testing.assert_allclose(warped[n, 0].numpy(), expected, atol=1e-9)


def pixel_centres_normalised(size: int = 28) -> np.ndarray:
    """``(size*size, 2)`` xy of pixel centres, row-major, in grid_sample's frame (align_corners=False)."""
    ticks = (2 * np.arange(size) + 1) / size - 1
    ys, xs = np.meshgrid(ticks, ticks, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], 1)


def sample_bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear reads of ``image`` at normalised ``xy`` with zeros outside, via scipy."""
    cols, rows = xy[:, 0] * 14 + 13.5, xy[:, 1] * 14 + 13.5
    return ndimage.map_coordinates(image, [rows, cols], order=1, mode="grid-constant").reshape(28, 28)


def test_projective_matches_numpy_homography():
    """Four draws of ``p``, and one whose strong perspective puts the map's horizon across the frame (a draw
    of seed 0, one of the 0.06 % of them with reads beyond the horizon): pixels beyond the horizon show
    nothing (before, a hundred of them showed a mirrored part of the image), the others read where the
    homography says."""
    images = blobs(5)
    images[4] = 1.0  # every position inside the image reads 1
    params = D.sample_params("p", 5, generator(5), dtype=torch.float64)
    params["scale"][4] = 0.82
    params["corner_shift"][4] = torch.tensor([[-1.0, 1.83], [-5.19, -4.07], [10.2, -5.78], [-9.41, -1.24]])
    warped = D.warp(images, "p", params)
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=float)
    for n in range(5):
        moved = float(params["scale"][n]) * corners + params["corner_shift"][n].numpy() / 14
        # DLT: the homography (output -> input) is the null vector of the 8x9 correspondence matrix
        rows = []
        for (x, y), (u, v) in zip(moved, corners):
            rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
            rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
        homography = np.linalg.svd(np.array(rows))[2][-1].reshape(3, 3)
        mapped = np.c_[pixel_centres_normalised(), np.ones(784)] @ homography.T
        # the centre of the convex quadrilateral the image's corners go to shows the image: its side of the horizon
        front = mapped[:, 2] * (homography[2] @ np.r_[moved.mean(0), 1]) > 0
        assert front.all() != (n == 4)
        xy = mapped[:, :2] / np.where(front, mapped[:, 2], 1.0)[:, None]
        xy[~front] = 5.0  # reads nothing
        expected = sample_bilinear(images[n, 0].numpy(), xy)
        np.testing.assert_allclose(warped[n, 0].numpy(), expected, atol=1e-9)
    assert not warped[4, 0].flatten()[torch.from_numpy(~front)].any()


def test_elastic_matches_scipy_thin_plate_spline():
    images = blobs(4)
    params = D.sample_params("e", 4, generator(7), dtype=torch.float64)
    warped = D.warp(images, "e", params)
    ticks = np.linspace(-1, 1, 4)
    grid = np.array([[x, y] for y in ticks for x in ticks])
    for n in range(4):
        source = (grid - params["point_shift"][n].numpy() / 14) / float(params["scale"][n])
        spline = RBFInterpolator(grid, source, kernel="thin_plate_spline", degree=1)
        expected = sample_bilinear(images[n, 0].numpy(), spline(pixel_centres_normalised()))
        np.testing.assert_allclose(warped[n, 0].numpy(), expected, atol=1e-9)


# ---------------------------------------------------------------- reproducibility and the Trainer hook


def test_eval_sets_ignore_batch_size_threads_and_instances(tmp_path):
    write_fake_mnist(tmp_path, train=1300, test=1200)
    threads = torch.get_num_threads()
    sets = []
    for batch_size, thread_count in ((64, threads), (512, 1)):
        torch.set_num_threads(thread_count)
        try:
            for name in ("p", "e"):
                datamodule = MNISTDataModule(root=tmp_path, distortion=name, batch_size=batch_size, val_size=1100, seed=batch_size)
                datamodule.setup()
                sets.append((datamodule.val_set.images, datamodule.test_set.images))
        finally:
            torch.set_num_threads(threads)
    for first, second in zip(sets[:2], sets[2:]):
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(sets[0][1], sets[1][1])


def test_training_generator_differs_by_epoch_and_rank_and_repeats():
    datamodule = MNISTDataModule(root="/nonexistent", distortion="rts", seed=3)
    draws = {
        (epoch, rank): torch.rand(8, generator=datamodule.training_generator(epoch, rank)) for epoch in (0, 1) for rank in (0, 1)
    }
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4
    again = MNISTDataModule(root="/nonexistent", distortion="rts", seed=3).training_generator(1, 0)
    assert torch.equal(torch.rand(8, generator=again), draws[(1, 0)])


class Recorder(L.LightningModule):
    """Keeps every batch the Trainer hands to training_step and validation_step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_batches: list[tuple[int, torch.Tensor]] = []
        self.train_maps: list[dict[str, torch.Tensor]] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append((self.current_epoch, batch[0].clone()))
        self.train_maps.append(batch[2])
        return (self.weight * batch[0].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[0].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quiet_trainer(root: Path, train_batches: int) -> L.Trainer:
    """Two epochs of ``train_batches`` steps and one validation batch, on the CPU, writing nothing."""
    return L.Trainer(
        max_epochs=2, limit_train_batches=train_batches, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=root,
    )


def test_trainer_distorts_training_batches_afresh_each_epoch(tmp_path):
    write_fake_mnist(tmp_path)
    datamodule = MNISTDataModule(root=tmp_path, distortion="r", batch_size=32, val_size=50, seed=11)
    model = Recorder()
    quiet_trainer(tmp_path, train_batches=2).fit(model, datamodule=datamodule)
    assert [epoch for epoch, _ in model.train_batches] == [0, 0, 1, 1]
    loader = datamodule.train_dataloader()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        draws = datamodule.training_generator(epoch)
        raw = [images for images, _ in loader][:2]
        for (_, seen), images in zip(model.train_batches[2 * epoch : 2 * epoch + 2], raw):
            assert seen.dtype == torch.float32 and seen.shape == (32, 1, 28, 28)
            assert torch.equal(seen, datamodule.distort(images, draws))
        # each training batch carries the digit map of its own draws, as evaluation batches do
        draws = datamodule.training_generator(epoch)
        for (_, seen), maps, images in zip(model.train_batches[2 * epoch : 2 * epoch + 2],
                                          model.train_maps[2 * epoch : 2 * epoch + 2], raw):
            params = D.sample_params("r", images.shape[0], draws, torch.float32)
            assert torch.equal(seen, D.warp(images, "r", params))
            torch.testing.assert_close(maps, D.digit_map("r", params), rtol=0, atol=0)
    # the same digits look different in epoch 1: fresh order and fresh distortions
    first_raw = [images for images, _ in loader][0]
    assert not torch.equal(datamodule.distort(first_raw, datamodule.training_generator(0)),
                           datamodule.distort(first_raw, datamodule.training_generator(1)))
    assert not torch.equal(model.train_batches[0][1], model.train_batches[2][1])
    # validation batches are the stored images, not distorted again
    assert len(model.val_batches) == 2
    assert all(torch.equal(seen, datamodule.val_set.images[:32]) for seen in model.val_batches)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resuming_from_an_epoch_checkpoint_replays_the_same_batches(tmp_path):
    write_fake_mnist(tmp_path)

    def fit(model, checkpoints, ckpt_path=None):
        trainer = L.Trainer(
            max_epochs=3, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
            callbacks=[ModelCheckpoint(dirpath=checkpoints, save_top_k=-1)], enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
        )
        datamodule = MNISTDataModule(root=tmp_path, distortion="e", batch_size=32, val_size=50, seed=5)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        return [images for epoch, images in model.train_batches if epoch == 2]

    uninterrupted = fit(Recorder(), checkpoints=tmp_path / "checkpoints")
    resumed = fit(Recorder(), tmp_path / "checkpoints", ckpt_path=next((tmp_path / "checkpoints").glob("epoch=1-*.ckpt")))
    assert len(resumed) == len(uninterrupted) == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted))


# ---------------------------------------------------------------- real MNIST


@pytest.mark.mnist
def test_real_mnist_shapes_ranges_balance_and_none_is_raw(mnist_root):
    raw = Path(mnist_root) / "MNIST" / "raw"
    train_labels = read_idx(raw / "train-labels-idx1-ubyte")
    test_images, test_labels = read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte")
    datamodule = MNISTDataModule(root=mnist_root, distortion="none")
    datamodule.prepare_data()
    datamodule.setup()
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (55000, 5000, 10000)
    assert torch.equal(datamodule.test_set.images, torch.from_numpy(test_images.copy()).float()[:, None] / 255)
    assert np.array_equal(datamodule.test_set.labels.numpy(), test_labels)
    counts = np.bincount(datamodule.train_set.labels.numpy(), minlength=10) + np.bincount(datamodule.val_set.labels.numpy(), minlength=10)
    assert np.array_equal(counts, np.bincount(train_labels, minlength=10))
    for labels in (datamodule.val_set.labels, datamodule.test_set.labels):
        shares = np.bincount(labels.numpy(), minlength=10) / len(labels)
        assert shares.min() > 0.08 and shares.max() < 0.125, shares
    images, labels = next(iter(datamodule.train_dataloader()))
    batch = datamodule.distort(images, datamodule.training_generator(0))
    assert torch.equal(batch, images.float() / 255) and labels.dtype == torch.int64


@pytest.mark.mnist
def test_real_mnist_rts_datamodule_is_identical_across_instances(mnist_root):
    first = MNISTDataModule(root=mnist_root, distortion="rts", batch_size=100, seed=1)
    second = MNISTDataModule(root=mnist_root, distortion="rts", batch_size=256, seed=2)
    for datamodule in (first, second):
        datamodule.setup()
    for split in ("val_set", "test_set"):
        a, b = getattr(first, split), getattr(second, split)
        assert a.images.shape[1:] == (1, 42, 42) and a.images.dtype == torch.float32
        assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    images, labels = next(iter(first.train_dataloader()))
    batch = first.distort(images, first.training_generator(0))
    assert batch.shape == (100, 1, 42, 42) and batch.dtype == torch.float32 and labels.shape == (100,)
    assert 0 <= float(batch.min()) and float(batch.max()) <= 1


@pytest.mark.mnist
def test_real_r_turns_digit_axes_by_the_drawn_angle(mnist_test_split):
    images, labels = mnist_test_split
    ones = images[labels == 1]  # elongated digits have a well-defined principal axis
    params = D.sample_params("r", len(ones), generator(1))
    turned = moments(D.warp(ones, "r", params))["orientation"]
    upright = moments(D.to_float(ones))["orientation"]
    error = np.degrees(np.abs(axis_difference(turned, upright + params["angle"].numpy())))
    assert np.median(error) < 2.0 and np.quantile(error, 0.9) < 6.0, (np.median(error), np.quantile(error, 0.9))
    # the spread of axis angles grows from 'nearly upright' to 'any angle within +-90 deg'
    spread_upright = np.degrees(np.abs(axis_difference(upright, np.full_like(upright, np.pi / 2)))).mean()
    spread_turned = np.degrees(np.abs(axis_difference(turned, np.full_like(turned, np.pi / 2)))).mean()
    assert spread_upright < 15 and spread_turned > 35, (spread_upright, spread_turned)
    angles = np.degrees(D.sample_params("r", 5000, generator(2))["angle"].numpy())
    assert -90 <= angles.min() < -89 and 89 < angles.max() <= 90


@pytest.mark.mnist
def test_real_rts_places_scales_and_spreads_digits_on_the_canvas(mnist_test_split):
    images, _ = mnist_test_split
    params = D.sample_params("rts", len(images), generator(4))
    original, placed = moments(D.to_float(images)), moments(D.warp(images, "rts", params))
    angle, scale, shift = (params[key].double().numpy() for key in ("angle", "scale", "shift"))
    assert 0.7 <= scale.min() < 0.71 and 1.19 < scale.max() <= 1.2 and np.degrees(np.abs(angle)).max() <= 45
    # the digit's centre lands at shift + scale * R(angle) (its offset from the 28x28 centre)
    cos, sin = np.cos(angle), np.sin(angle)
    offset = original["centre"]
    predicted = shift + scale[:, None] * np.stack([cos * offset[:, 0] - sin * offset[:, 1], sin * offset[:, 0] + cos * offset[:, 1]], 1)
    error = np.linalg.norm(placed["centre"] - predicted, axis=1)
    assert np.quantile(error, 0.99) < 0.3, np.quantile(error, 0.99)
    assert placed["centre"].std(0).min() > 3.5 and original["centre"].std(0).max() < 1.0
    assert np.abs(placed["centre"]).max() < 21 - 5
    # its size follows the drawn scale
    ratio = placed["radius"] / original["radius"]
    assert np.quantile(np.abs(ratio / scale - 1), 0.99) < 0.02 and ratio.min() < 0.73 and ratio.max() > 1.17


def ink_centre(images: np.ndarray, forward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the warped digit's centre of mass lands, from the forward map alone (no resampling).

    ``forward`` ``(N, 28, 28, 2)``: the output position (normalised) of each input pixel centre. The
    warped ink is the input ink times the map's area change |det J|, so its centre is the |det J|-
    weighted mean of the forward positions. Returns the centres ``(N, 2)`` in pixels from the image
    centre, and whether all of a digit's ink stays inside the 28x28 frame ``(N,)``.
    """
    d_col, d_row = np.gradient(forward, axis=2), np.gradient(forward, axis=1)
    area = np.abs(d_col[..., 0] * d_row[..., 1] - d_col[..., 1] * d_row[..., 0])
    weight = images * area
    centre = 14 * (forward * weight[..., None]).sum((1, 2)) / weight.sum((1, 2))[:, None]
    inside = np.all(np.where(images[..., None] > 0, np.abs(forward) < 1 - 1 / 14, True), axis=(1, 2, 3))
    return centre, inside


def check_centres(images: torch.Tensor, warped: torch.Tensor, forward: np.ndarray, scale: np.ndarray, min_spread: float):
    """The measured centres of ``warped`` match the forward-map prediction and move measurably."""
    predicted, inside = ink_centre(images[:, 0].double().numpy(), forward)
    measured = moments(warped)["centre"]
    error = np.linalg.norm(measured - predicted, axis=1)[inside]
    moved = (measured - scale[:, None] * moments(D.to_float(images))["centre"])[inside]  # vs the digit only scaled
    assert inside.mean() > 0.6 and np.median(error) < 0.1 and np.quantile(error, 0.9) < 0.3, (inside.mean(), np.quantile(error, [0.5, 0.9]))
    assert np.all(moved.std(0) > min_spread), moved.std(0)


@pytest.mark.mnist
def test_real_p_moves_digits_as_the_corner_homography_predicts(mnist_test_split):
    images = mnist_test_split[0][:1000]
    params = D.sample_params("p", len(images), generator(6))
    scale, shifts = params["scale"].double().numpy(), params["corner_shift"].double().numpy()
    assert 0.75 <= scale.min() < 0.76 and 0.99 < scale.max() <= 1.0 and abs(shifts.std() - 5.0) < 0.2
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=float)
    pixels = np.c_[pixel_centres_normalised(), np.ones(784)]
    forward = []
    for n in range(len(images)):  # DLT homography: input corners -> scaled and shifted corners
        moved = scale[n] * corners + shifts[n] / 14
        rows = []
        for (x, y), (u, v) in zip(corners, moved):
            rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y, -u], [0, 0, 0, x, y, 1, -v * x, -v * y, -v]]
        mapped = pixels @ np.linalg.svd(np.array(rows))[2][-1].reshape(3, 3).T
        forward.append((mapped[:, :2] / mapped[:, 2:]).reshape(28, 28, 2))
    # corners moved by N(0, 5 px) shift the digit by several pixels
    check_centres(images, D.warp(images, "p", params), np.array(forward), scale, min_spread=2.0)
    scaled = D.warp(images, "p", {**params, "corner_shift": torch.zeros(len(images), 4, 2)})
    ratio = moments(scaled)["radius"] / moments(D.to_float(images))["radius"]
    assert np.quantile(np.abs(ratio / scale - 1), 0.99) < 0.02


@pytest.mark.mnist
def test_real_e_moves_digits_as_the_spline_through_shifted_points_predicts(mnist_test_split):
    images = mnist_test_split[0][:500]
    params = D.sample_params("e", len(images), generator(8))
    scale, shifts = params["scale"].double().numpy(), params["point_shift"].double().numpy()
    assert 0.75 <= scale.min() < 0.76 and 0.99 < scale.max() <= 1.0 and abs(shifts.std() - 1.5) < 0.05
    ticks = np.linspace(-1, 1, 4)
    spline = RBFInterpolator(np.array([[x, y] for y in ticks for x in ticks]), np.eye(16), kernel="thin_plate_spline", degree=1)
    scaled_pixels = scale[:, None, None, None] * pixel_centres_normalised().reshape(1, 28, 28, 2)
    forward = scaled_pixels
    for _ in range(4):  # the output position g of input pixel q solves g - spline(shifts)(g) / 14 = scale q
        weights = spline(forward.reshape(-1, 2)).reshape(*forward.shape[:3], 16)
        forward = scaled_pixels + np.einsum("nhwi,nik->nhwk", weights, shifts) / 14
    # grid points moved by N(0, 1.5 px) shift the digit by about a pixel
    check_centres(images, D.warp(images, "e", params), forward, scale, min_spread=0.5)


# ---------------------------------------------------------------- the preview script


def test_preview_script_writes_the_png_of_what_the_model_sees(tmp_path):
    data = tmp_path / "data"
    write_fake_mnist(data)
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "preview_data.py"), "data.distortion=rts", f"data.root={data}",
        "data.val_size=50", f"paths.output_root={tmp_path / 'outputs'}", "rows=4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".png" and (tmp_path / "outputs") in path.parents
    picture = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    panel = 4 * (42 + 2) + 2
    assert tuple(picture.shape) == (3, panel, 2 * panel + 8)
    datamodule = MNISTDataModule(root=data, distortion="rts", val_size=50)
    datamodule.setup("test")
    expected = (datamodule.test_set.images[:4, 0] * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    for column in range(4):
        left = panel + 8 + 2 + column * 44
        assert torch.equal(picture[0, 2 : 2 + 42, left : left + 42], expected[column])


# ---------------------------------------------------------------- curriculum, eval digit maps


@pytest.mark.parametrize("name", ["r", "rts", "p", "e"])
def test_strength_scales_the_same_draws_towards_no_distortion(name):
    full = D.sample_params(name, 64, torch.Generator().manual_seed(4), torch.float64)
    half = D.sample_params(name, 64, torch.Generator().manual_seed(4), torch.float64, strength=0.5)
    none = D.sample_params(name, 64, torch.Generator().manual_seed(4), torch.float64, strength=0.0)
    for key, value in full.items():
        if key == "scale":
            torch.testing.assert_close(half[key], value.sqrt())
            torch.testing.assert_close(none[key], torch.ones_like(value))
        elif key != "shift" and not (name == "p" and key == "corner_shift"):  # p redraws folded quads at full strength
            torch.testing.assert_close(half[key], 0.5 * value)
            torch.testing.assert_close(none[key], torch.zeros_like(value))
    digits = torch.rand(64, 1, 28, 28, dtype=torch.float64)
    undistorted = D.distort(digits, name, torch.Generator().manual_seed(4), strength=0.0)
    if name == "rts":  # the undistorted digit, upright and centred on the 42x42 canvas
        torch.testing.assert_close(undistorted[..., 7:35, 7:35], digits, atol=1e-12, rtol=0)
        assert undistorted[..., :7, :].abs().max() == 0
    else:
        torch.testing.assert_close(undistorted, digits, atol=1e-12, rtol=0)


def test_curriculum_strength_per_epoch_and_bad_settings():
    datamodule = MNISTDataModule(root="/nonexistent", distortion="rts", clean_epochs=1, growth_epochs=4)
    assert [datamodule.strength(p) for p in (0.0, 0.99, 1.0, 2.0, 3.0, 5.0, 9.0)] == [0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert MNISTDataModule(root="/nonexistent").strength(0.0) == 1.0
    with pytest.raises(ValueError, match=r"data.growth_epochs must be a number of epochs >= 0"):
        MNISTDataModule(root="/nonexistent", growth_epochs=-1)


def test_trainer_grows_the_training_distortion_step_by_step(tmp_path):
    write_fake_mnist(tmp_path)
    datamodule = MNISTDataModule(root=tmp_path, distortion="r", batch_size=32, val_size=50, seed=11, growth_epochs=2)
    model = Recorder()
    quiet_trainer(tmp_path, train_batches=4).fit(model, datamodule=datamodule)
    loader = datamodule.train_dataloader()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        draws = datamodule.training_generator(epoch)
        raw = [images for images, _ in loader][:4]
        for batch, ((_, seen), images) in enumerate(zip(model.train_batches[4 * epoch : 4 * epoch + 4], raw)):
            strength = (epoch + batch / 4) / 2  # linear from 0 at the first step to 7/8 at the last
            assert torch.equal(seen, datamodule.distort(images, draws, strength))


def test_eval_batches_carry_the_digit_map_of_each_image(tmp_path):
    write_fake_mnist(tmp_path)
    datamodule = MNISTDataModule(root=tmp_path, distortion="rts", batch_size=32, val_size=50)
    datamodule.setup()
    images, labels, maps = next(iter(datamodule.test_dataloader()))
    assert images.shape == (32, 1, 42, 42) and set(maps) == {"homography"} and maps["homography"].shape == (32, 3, 3)
    seed = D.generator_seed(_TEST_STREAM, 0)
    params = D.dataset_params("rts", 100, seed)
    torch.testing.assert_close(maps["homography"], D.digit_map("rts", params)["homography"][:32].float())
    # the map belongs to the stored images: they are the raw digits warped with those parameters
    raw = torch.from_numpy(read_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").copy())[:32, None]
    expected = D.warp(raw.double() / 255, "rts", {key: value[:32] for key, value in params.items()}).float()
    torch.testing.assert_close(images, expected)
    assert len(next(iter(datamodule.train_dataloader()))) == 2  # training batches stay (images, labels)
    plain = MNISTDataModule(root=tmp_path, val_size=50, distortion="none")
    plain.setup("test")
    assert len(next(iter(plain.test_dataloader()))) == 2  # no distortion, no digit map
