"""MNISTDataModule: MNIST under the paper's distortions, seeded, batched, distorted on the model's device.

Training batches leave the dataloader as raw uint8 digits ``(B, 1, 28, 28)`` and are distorted after
they reach the model's device, in :meth:`MNISTDataModule.on_after_batch_transfer`, by a generator seeded
from ``(seed, epoch, rank)``: fresh distortions every epoch, a different stream on every DDP rank, and
the same stream again when a run resumes from an epoch-end checkpoint. Lightning calls that hook only
when the datamodule is passed to the trainer (``trainer.fit(model, datamodule=dm)``).

Validation and test images are distorted once, at :meth:`~MNISTDataModule.setup`, on the CPU from
``eval_seed`` (see :func:`stn.data.distortions.distort_dataset`), and kept as float32 tensors: every run
and every model is scored on identical images. Their batches carry a third entry, each image's digit
map (:func:`stn.data.distortions.digit_map`), so the model can measure how much of the distortion its
transformer undoes (:mod:`stn.pose`); distorted training batches carry theirs too (for
``model.oracle_pose``, the floor of that measure).

``clean_epochs`` and ``growth_epochs`` make a curriculum: training digits stay undistorted for
``clean_epochs`` epochs, then the distortion grows linearly, step by step, from none to full strength
over ``growth_epochs`` epochs. Evaluation images are always at full strength.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from stn.data.distortions import (
    check_distortion,
    dataset_params,
    digit_map,
    distort,
    distort_dataset,
    distort_with_map,
    generator_seed,
    output_size,
)
from stn.data.mnist_files import download, read_split, resolve_root
from stn.errors import SettingError

__all__ = ["MNISTDataModule", "TensorPairs", "EpochRandomSampler"]

# The first key of every seed, so that no two random streams of the datamodule share a seed.
_TRAIN_STREAM, _SHUFFLE_STREAM, _SPLIT_STREAM, _VAL_STREAM, _TEST_STREAM = range(5)


class TensorPairs(Dataset):
    """``(image, label)`` pairs held as two tensors; :meth:`__getitems__` fetches a batch with one index.

    Args:
        images: ``(N, C, H, W)``.
        labels: ``(N,)`` int64.
        extras: optional per-image tensors ``{name: (N, ...)}`` (e.g. the digit map); when given,
            items and batches are ``(image, label, {name: value})``.
    """

    def __init__(self, images: Tensor, labels: Tensor, extras: dict[str, Tensor] | None = None):
        self.images = images
        self.labels = labels
        self.extras = dict(extras or {})

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _pick(self, index: int | Tensor) -> tuple:
        if not self.extras:
            return self.images[index], self.labels[index]
        return self.images[index], self.labels[index], {name: value[index] for name, value in self.extras.items()}

    def __getitem__(self, index: int) -> tuple:
        return self._pick(index)

    def __getitems__(self, indices: list[int]) -> tuple:
        """``(B, C, H, W)`` images, ``(B,)`` labels (and the extras); the DataLoader passes them unchanged."""
        return self._pick(torch.as_tensor(indices))


def _keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for :class:`TensorPairs`: the batch is already stacked."""
    return batch


class EpochRandomSampler(RandomSampler):
    """Shuffles with a permutation drawn from ``(seed, epoch)``; Lightning calls :meth:`set_epoch`.

    The order of an epoch is therefore the same in a fresh run and in one resumed at that epoch. Under
    DDP Lightning replaces this sampler (a ``RandomSampler``) with a ``DistributedSampler`` that shuffles
    from the global seed and the epoch.
    """

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(generator_seed(_SHUFFLE_STREAM, self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def _check_epochs(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise SettingError(
            f"data.{name} must be a number of epochs >= 0, got {value!r}. Set e.g. data.{name}=0 to switch "
            "this part of the curriculum off."
        )
    return float(value)


def _check_count(name: str, value: int, minimum: int, meaning: str, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SettingError(f"data.{name} must be an integer >= {minimum} ({meaning}), got {value!r}. Set e.g. data.{name}={example}.")
    return int(value)


class MNISTDataModule(LightningDataModule):
    """MNIST under one of the distortions of Jaderberg et al. 2015, Table 1.

    Args:
        root: folder holding ``MNIST/raw/`` (torchvision layout); ``None`` means ``$STN_DATA_DIR`` when
            set, else ``data/`` in the repository. Missing files are downloaded by :meth:`prepare_data`.
        distortion: ``none``, ``r``, ``rts``, ``p`` or ``e`` (see :mod:`stn.data.distortions`).
        batch_size: images per batch, for all three splits.
        num_workers: DataLoader worker processes; 0 is fastest here (data is in memory, batches are
            one index each, and distortion runs on the model's device).
        val_size: images split off the 60k training set for validation.
        seed: training randomness: shuffling and the distortions of every epoch.
        eval_seed: the validation split and the validation/test distortions. Keep it fixed (default 0)
            so that runs with different ``seed`` are scored on the same images.
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
        clean_epochs: epochs of undistorted training digits before the distortion starts (a
            curriculum the paper's models did not have; 0: none).
        growth_epochs: epochs over which the training distortion then grows linearly from none to
            full strength (0: full strength at once).

    Batches are ``(images, labels, digit_map)``: images float32 ``(B, 1, H, W)`` in [0, 1] with ``(H, W)`` =
    :attr:`image_size`, labels int64 ``(B,)``, the digit map of each image (a dict of tensors; for
    ``none`` it is empty and left out). Training batches are uint8 ``(B, 1, 28, 28)`` without a map until
    :meth:`on_after_batch_transfer` distorts them and adds it (outside a Trainer use :meth:`distort`).
    """

    num_classes = 10

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        distortion: str = "none",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        eval_seed: int = 0,
        pin_memory: bool = False,
        clean_epochs: float = 0.0,
        growth_epochs: float = 0.0,
    ):
        super().__init__()
        self.root = resolve_root(root)
        self.distortion = check_distortion(distortion)
        self.batch_size = _check_count("batch_size", batch_size, 1, "images per batch", 128)
        self.num_workers = _check_count("num_workers", num_workers, 0, "DataLoader worker processes", 0)
        self.val_size = _check_count("val_size", val_size, 1, "training images held out for validation", 5000)
        self.seed = _check_count("seed", seed, 0, "the seed of shuffling and training distortions", 0)
        self.eval_seed = _check_count("eval_seed", eval_seed, 0, "the seed of the validation split and eval distortions", 0)
        self.pin_memory = bool(pin_memory)
        self.clean_epochs = _check_epochs("clean_epochs", clean_epochs)
        self.growth_epochs = _check_epochs("growth_epochs", growth_epochs)
        self._batch_in_epoch = 0
        self.train_set: TensorPairs | None = None
        self.val_set: TensorPairs | None = None
        self.test_set: TensorPairs | None = None
        self._generator: torch.Generator | None = None
        self._generator_key: tuple | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images the model receives: ``(42, 42)`` for rts, else ``(28, 28)``."""
        return output_size(self.distortion)

    def prepare_data(self) -> None:
        """Download MNIST into :attr:`root` if it is missing; check that the four files are whole."""
        download(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs and distort validation/test images once."""
        if stage in (None, "fit", "validate") and self.val_set is None:
            images, labels = read_split(self.root, train=True)
            if self.val_size >= labels.shape[0]:
                raise SettingError(
                    f"data.val_size={self.val_size} leaves no training images: the training file holds "
                    f"{labels.shape[0]}. Set data.val_size below that, e.g. data.val_size=5000."
                )
            split = torch.Generator().manual_seed(generator_seed(_SPLIT_STREAM, self.eval_seed))
            order = torch.randperm(labels.shape[0], generator=split)
            val, train = order[: self.val_size], order[self.val_size :]
            self.train_set = TensorPairs(images[train], labels[train])
            self.val_set = self._eval_set(images[val], labels[val], generator_seed(_VAL_STREAM, self.eval_seed))
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = read_split(self.root, train=False)
            self.test_set = self._eval_set(images, labels, generator_seed(_TEST_STREAM, self.eval_seed))

    def _eval_set(self, images: Tensor, labels: Tensor, seed: int) -> TensorPairs:
        """Images distorted once from ``seed``, with each image's digit map (float32) as extras."""
        params = dataset_params(self.distortion, images.shape[0], seed)
        distorted = distort_dataset(images, self.distortion, seed, params)
        maps = {name: value.float() for name, value in digit_map(self.distortion, params).items()}
        return TensorPairs(distorted, labels, maps)

    @staticmethod
    def _loaded(dataset: TensorPairs | None, split: str) -> TensorPairs:
        if dataset is None:
            raise RuntimeError(f"The {split} split is not loaded: call setup() before {split}_dataloader().")
        return dataset

    def _loader(self, dataset: TensorPairs, sampler: RandomSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=_keep_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled raw digits, uint8 ``(B, 1, 28, 28)``; distorted on arrival by the hook."""
        dataset = self._loaded(self.train_set, "train")
        return self._loader(dataset, EpochRandomSampler(dataset, self.seed))

    def val_dataloader(self) -> DataLoader:
        """The fixed validation images, float32 ``(B, 1, H, W)``, in a fixed order."""
        return self._loader(self._loaded(self.val_set, "val"))

    def test_dataloader(self) -> DataLoader:
        """The fixed test images, float32 ``(B, 1, H, W)``, in a fixed order."""
        return self._loader(self._loaded(self.test_set, "test"))

    def training_generator(self, epoch: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator of the training distortions of ``epoch`` on process ``rank``.

        Seeded from ``(seed, epoch, rank)``, so an epoch's draws are the same in a fresh run and in a
        run resumed at that epoch, and differ between epochs and between DDP ranks.
        """
        return torch.Generator(device=device).manual_seed(generator_seed(_TRAIN_STREAM, self.seed, epoch, rank))

    def strength(self, progress: float) -> float:
        """Training distortion strength in [0, 1] after ``progress`` epochs (fractional) of training."""
        if progress < self.clean_epochs:
            return 0.0
        if self.growth_epochs == 0:
            return 1.0
        return min(1.0, (progress - self.clean_epochs) / self.growth_epochs)

    def distort(self, images: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
        """Distort a batch of raw digits with this datamodule's distortion.

        Args:
            images: ``(B, 1, 28, 28)`` uint8 in [0, 255] or float in [0, 1], on ``generator.device``.
            strength: in [0, 1], how much of the distortion to apply.

        Returns:
            ``(B, 1, H, W)`` float32 in [0, 1], ``(H, W)`` = :attr:`image_size`.
        """
        return distort(images, self.distortion, generator, strength)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple:
        """Distort training batches on the model's device, adding each image's digit map as validation/test
        batches carry it (left out for ``none``); validation/test batches pass unchanged."""
        if self.trainer is None or not self.trainer.training:
            return batch
        images, labels = batch
        key = (self.trainer.current_epoch, self.trainer.global_rank, images.device)
        if self._generator_key != key:
            self._generator = self.training_generator(*key)
            self._generator_key = key
            self._batch_in_epoch = 0
        progress = self._batch_in_epoch / max(1, self.trainer.num_training_batches)
        strength = self.strength(self.trainer.current_epoch + progress)
        self._batch_in_epoch += 1
        distorted, maps = distort_with_map(images, self.distortion, self._generator, strength)
        return (distorted, labels, maps) if maps else (distorted, labels)
