"""The LightningModule: spatial transformer + classifier, losses, metrics, optimiser, image logging."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from stn.classifier import CNNClassifier
from stn.tps import bending_energy
from stn.transformer import SpatialTransformer
from stn.viz import draw_mesh, draw_points, image_grid

__all__ = ["STNClassifier"]

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULERS = ("onecycle", "cosine", "none")


class STNClassifier(L.LightningModule):
    """Classify images through a spatial transformer: ``logits = classifier(transformer(x))``.

    Args:
        transform: ``"tps"``, ``"affine"`` or ``"none"`` (the classifier alone).
        num_classes: number of classes.
        in_channels: image channels.
        output_size: ``(H', W')`` of the warped image the classifier reads; ``None``: input size.
        align_corners: the grid convention of every grid builder and sampler.
        padding_mode: ``grid_sample`` padding for reads outside the image.
        loc_net: keyword arguments of :class:`~stn.localization.LocalizationNet`.
        tps: ``rows``, ``cols``, ``margin`` of the TPS control-point layout.
        classifier: keyword arguments of :class:`~stn.classifier.CNNClassifier`.
        bending_weight: weight of the mean TPS bending energy added to the loss (``tps`` only).
        optimizer: ``name`` (adamw | adam | sgd), ``lr`` and the optimiser's other keyword arguments.
        scheduler: ``name`` (onecycle | cosine | none) and its keyword arguments.
        channels_last: run the classifier in channels-last memory format (faster convolutions on
            CPUs and tensor cores).
        log_images_every_n_epochs: how often to log image grids to TensorBoard (0: never).
        num_log_images: how many images of the first validation batch to log.
    """

    def __init__(
        self,
        transform: str = "tps",
        num_classes: int = 10,
        in_channels: int = 1,
        output_size: tuple[int, int] | None = None,
        align_corners: bool = False,
        padding_mode: str = "zeros",
        loc_net: dict | None = None,
        tps: dict | None = None,
        classifier: dict | None = None,
        bending_weight: float = 0.0,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        channels_last: bool = False,
        log_images_every_n_epochs: int = 1,
        num_log_images: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.transformer = SpatialTransformer(
            transform, loc_net=loc_net, output_size=output_size, align_corners=align_corners,
            padding_mode=padding_mode, **(tps or {}),
        )
        self.classifier = CNNClassifier(in_channels=in_channels, num_classes=num_classes, **(classifier or {}))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.classifier.to(memory_format=self.memory_format)
        self.bending_weight = float(bending_weight)
        self.optimizer_config = dict(optimizer or {"name": "adamw", "lr": 1e-3})
        self.scheduler_config = dict(scheduler or {"name": "none"})
        _check_optimization(self.optimizer_config, self.scheduler_config)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run knows its best
        self._log_batch: Tensor | None = None

    @property
    def pretrained(self) -> bool:
        """Whether the loc-net backbone started from pretrained weights."""
        loc_net = self.transformer.loc_net
        return bool(loc_net is not None and loc_net.pretrained)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` for images ``(N, C, H, W)`` in ``[0, 1]``."""
        return self.classify(self.transformer(images))

    def classify(self, warped: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` for warped images ``(N, C, H', W')``."""
        return self.classifier(warped.contiguous(memory_format=self.memory_format))

    def _step(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        params = self.transformer.localize(images)
        warped = self.transformer.sample(images, self.transformer.grid(params, images))
        return self.classify(warped), params

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits, params = self._step(images)
        loss = F.cross_entropy(logits, labels)
        if self.bending_weight and self.transformer.transform == "tps":
            bending = bending_energy(params, self.transformer.target_points).mean()
            self.log("train/bending", bending, on_step=True, on_epoch=False)
            loss = loss + self.bending_weight * bending
        self._check_finite(loss)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _check_finite(self, loss: Tensor) -> None:
        if torch.isfinite(loss):
            return
        loc_net = self.transformer.loc_net
        lr = self.optimizer_config.get("lr")
        lr_mult = None if loc_net is None else loc_net.lr_mult
        raise FloatingPointError(
            f"The training loss is {loss.item()} at epoch {self.current_epoch}, step "
            f"{self.global_step}. The usual cause is a localization network that moves too fast: its "
            "control points run off the image, the sampling grid folds and the classifier diverges. "
            f"Lower model.loc_net.lr_mult (now {lr_mult}) or model.optimizer.lr (now {lr}), set "
            "model.loc_net.bounded=true (with model.tps.margin > 0), or add model.bending_weight > 0."
        )

    def _eval_step(self, batch: tuple[Tensor, Tensor], acc: MulticlassAccuracy, mean_loss: MeanMetric) -> None:
        images, labels = batch
        logits = self(images)
        mean_loss(F.cross_entropy(logits, labels), weight=labels.numel())
        acc(logits, labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self._log_batch = batch[0][: self.hparams.num_log_images].detach()
        self._eval_step(batch, self.val_acc, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", acc, prog_bar=True)
        self.val_acc.reset()
        self.val_loss.reset()
        if not self.trainer.sanity_checking:
            self.val_acc_best(acc)
            self.log("val/acc_best", self.val_acc_best.compute())
            self._log_images()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, self.test_loss)

    def on_test_epoch_end(self) -> None:
        acc = self.test_acc.compute()
        self.log("test/loss", self.test_loss.compute())
        self.log("test/acc", acc)
        self.log("test/error", 100.0 * (1.0 - acc))
        self.test_acc.reset()
        self.test_loss.reset()

    def _log_images(self) -> None:
        every = self.hparams.log_images_every_n_epochs
        writer = getattr(self.logger, "experiment", None)
        if not every or self._log_batch is None or not hasattr(writer, "add_image"):
            return
        last_epoch = self.current_epoch + 1 == self.trainer.max_epochs
        if (self.current_epoch + 1) % every and not last_epoch:
            return
        for tag, image in self.visualize(self._log_batch).items():
            writer.add_image(f"images/{tag}", image, global_step=self.global_step)

    @torch.no_grad()
    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        """Image grids ``(3, H, W)`` in ``[0, 1]`` for images ``(N, C, H, W)``.

        Keys: ``input``, ``warped``, ``control_points`` (the target-point layout where the
        transform reads it, on the input) and ``mesh`` (the deformed sampling grid on the input).
        """
        transformer = self.transformer
        params = transformer.localize(images)
        grid = transformer.grid(params, images)
        points = transformer.control_points(params, images.shape[0])
        return {
            "input": image_grid(images),
            "warped": image_grid(transformer.sample(images, grid)),
            "control_points": image_grid(draw_points(images, points, transformer.align_corners)),
            "mesh": image_grid(draw_mesh(images, grid, transformer.align_corners)),
        }

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.param_groups()
        config = dict(self.optimizer_config)
        optimizer = OPTIMIZERS[config.pop("name")](groups, **{k: v for k, v in config.items() if k != "lr"})
        scheduler = self._scheduler(optimizer)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: classifier, loc-net head, loc-net backbone.

        The loc-net head runs at ``lr * loc_net.lr_mult`` without weight decay (decay would pull
        its bias, the identity control points, towards zero); the backbone at
        ``lr * loc_net.lr_mult * loc_net.backbone_lr_mult``. Frozen parameters are left out.
        """
        lr = float(self.optimizer_config["lr"])
        groups = [{"name": "classifier", "params": list(self.classifier.parameters()), "lr": lr}]
        loc_net = self.transformer.loc_net
        if loc_net is not None:
            groups.append({"name": "loc_head", "params": list(loc_net.head.parameters()),
                           "lr": lr * loc_net.lr_mult, "weight_decay": 0.0})
            backbone = [p for p in loc_net.backbone.parameters() if p.requires_grad]
            if backbone:
                groups.append({"name": "loc_backbone", "params": backbone,
                               "lr": lr * loc_net.lr_mult * loc_net.backbone_lr_mult})
        return groups

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        config = dict(self.scheduler_config)
        name = config.pop("name")
        if name == "none":
            return None
        total = int(self.trainer.estimated_stepping_batches)
        if name == "onecycle":
            max_lr = [group["lr"] for group in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, **config)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, **config)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pretrained"] = self.pretrained

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> STNClassifier:
        """Rebuild a trained model from a checkpoint without fetching backbone weights again."""
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        hparams = dict(checkpoint["hyper_parameters"])
        hparams["loc_net"] = {**(hparams.get("loc_net") or {}), "weights": None}
        model = cls(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
        if model.transformer.loc_net is not None:
            model.transformer.loc_net.pretrained = bool(checkpoint.get("pretrained", False))
        return model


def _check_optimization(optimizer: dict, scheduler: dict) -> None:
    name = optimizer.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {name!r}. Set model.optimizer.name to one of {', '.join(OPTIMIZERS)}."
        )
    lr = optimizer.get("lr")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"model.optimizer.lr must be a positive number, got {lr!r}.")
    if scheduler.get("name") not in SCHEDULERS:
        raise ValueError(
            f"Unknown scheduler {scheduler.get('name')!r}. Set model.scheduler.name to one of "
            f"{', '.join(SCHEDULERS)}."
        )
