"""The LightningModule: spatial transformer + classifier, losses, metrics, optimiser, image logging."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from stn.checkpoints import check_architecture, load_checkpoint
from stn.classifier import CNNClassifier
from stn.compilation import compile_networks
from stn.curriculum import check_epoch_range, check_stage_start, hold
from stn.divergence import LossWatch, diverged_error
from stn.errors import CorruptInputError, SettingError
from stn.health import loc_net_health
from stn.localization import random_backbones_replaced
from stn.optimization import DEFAULT_OPTIMIZER, build_optimizer, build_scheduler, check_optimization
from stn.pose import DIGIT_HALF_SIZE, MIN_READ, AngleSlope, PoseSpread, fit_similarity, frame_weights, pose_report, to_digit
from stn.transformer import SpatialTransformer
from stn.viz import transformer_panels

__all__ = ["STNClassifier"]

log = logging.getLogger(__name__)


class STNClassifier(L.LightningModule):
    """Classify images through a spatial transformer: ``logits = classifier(transformer(x))``.

    At validation and test, when the batches carry each image's digit map (the MNIST data module's
    do), it also measures how much of the distortion the transformer leaves (:mod:`stn.pose`):
    ``val/pose/angle``, ``.../angle_identity``, ``.../angle_left`` and the same for ``log_scale``,
    ``shift`` and ``residual``, ``.../lost`` (the share of images whose output reads under
    :data:`~stn.pose.MIN_READ` pixels of the digit's frame, left out of the spreads), and where the distortion
    turns the digits ``.../angle_slope`` and ``.../angle_scatter`` (:class:`~stn.pose.AngleSlope`); for a
    transformer of several stages, what its first ``k`` stages alone leave, ``.../stage<k>/angle_left`` (and
    ``log_scale``, ``shift``, ``residual`` where the distortion has them). Once per validation it logs the
    loc-nets' health on the first validation batch: the spread of each stage's predicted parameters
    (``loc/stage<k>/param_std``) and the share of its head's hidden units that are dead on every image
    (``loc/stage<k>/dead_units``).

    Args:
        transform: ``"tps"``, ``"affine"``, ``"similarity"``, a list of them composed in order (e.g.
            ``["similarity", "tps"]``), or ``"none"`` (the classifier alone).
        num_classes: number of classes.
        in_channels: image channels.
        output_size: ``(H', W')`` of the warped image the classifier reads; ``None``: input size.
        align_corners: the grid convention of every grid builder and sampler.
        padding_mode: ``grid_sample`` padding for reads outside the image.
        loc_net: keyword arguments of :class:`~stn.localization.LocalizationNet`, shared by every stage.
        stage_loc_nets: one mapping per stage overriding ``loc_net`` for that stage's loc-net (``{}``: as
            ``loc_net``), e.g. a wider backbone or its own ``lr_mult`` for the first stage only; ``None``:
            ``loc_net`` everywhere.
        tps: ``rows``, ``cols``, ``margin`` of the TPS control-point layout.
        classifier: keyword arguments of :class:`~stn.classifier.CNNClassifier`.
        bending_weight: weight of the mean TPS bending energy added to the loss (``tps`` only).
        optimizer: ``_target_`` (a ``torch.optim`` optimiser's import path), ``lr`` and its other keyword
            arguments (:mod:`stn.optimization`); it is called with :meth:`param_groups`.
        scheduler: ``_target_`` (a ``torch.optim.lr_scheduler`` class) and its keyword arguments, stepped
            every training step; ``None``: a constant learning rate.
        channels_last: run the classifier and the loc-net backbones in channels-last memory format
            (faster convolutions on CPUs and tensor cores).
        log_images_every_n_epochs: how often to log image grids to TensorBoard (0: never).
        num_log_images: how many images of the first validation batch to log.
        freeze_classifier: ``(first, end)`` training epochs ``first <= epoch < end`` in which the
            classifier is frozen (no updates, evaluation mode for its batch norm and dropout), so that
            only the transformer can lower the loss; ``None``: never. With a curriculum
            (``data.clean_epochs``) the classifier first learns upright digits, and while it is frozen
            the transformer must bring distorted ones to that pose.
        stage_start: one training epoch per stage from which its loc-net learns; before it the loc-net is
            held (no updates, evaluation mode) and its stage keeps its initial map, the identity for a fresh
            loc-net (:mod:`stn.curriculum`). ``[0, 5]`` for ``[similarity, tps]``: the TPS joins at epoch 5,
            once the similarity has learned the pose. ``None``: every stage from epoch 0.
        oracle_pose: the floor of the pose measure, not an unsupervised model: the transformer learns
            from each training image's true distortion instead of the class label (the mean squared
            distance, in digit pixels, between where its output pixels read the upright digit and
            where the exact inverse reads it, ``train/pose_error``), and the classifier learns on the
            transformer's output. What such a transformer leaves (``test/pose/*_left``) is what its
            loc-net can see of the pose at all. ``[first, end]``: only in the training epochs
            ``first <= epoch < end``, a pose-supervised warm-up (outside them the class label alone
            teaches the transformer), e.g. ``[1, 5]``: the transformer starts the joint epochs from the pose,
            not from the identity. ``False``: never.
        compile: compile the loc-nets and the classifier with ``torch.compile`` when training or
            testing starts (``True``, or a dict of its keyword arguments, e.g. ``{"mode":
            "max-autotune"}``); networks that cannot be compiled run eagerly (:mod:`stn.compilation`).
        detach_views: a later stage's loc-net reads the earlier stages' view with no gradient into them
            (a cheaper backward; :class:`~stn.transformer.SpatialTransformer`).
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
        freeze_classifier: tuple[float, float] | None = None,
        oracle_pose: bool | Sequence[float] = False,
        compile: bool | dict = False,
        stage_loc_nets: Sequence[Mapping | None] | None = None,
        stage_start: Sequence[int] | None = None,
        detach_views: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_output_size(output_size)
        self.optimizer_config = dict(optimizer or DEFAULT_OPTIMIZER)
        self.scheduler_config = None if scheduler is None else dict(scheduler)
        check_optimization(self.optimizer_config, self.scheduler_config)
        self.transformer = SpatialTransformer(
            transform, loc_net=loc_net, output_size=output_size, align_corners=align_corners,
            padding_mode=padding_mode, stage_loc_nets=stage_loc_nets, detach_views=detach_views,
            **(tps or {}),
        )
        self.classifier = CNNClassifier(in_channels=in_channels, num_classes=num_classes, **(classifier or {}))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.classifier.to(memory_format=self.memory_format)
        for loc_net in self.transformer.loc_nets:
            loc_net.to(memory_format=self.memory_format)
            loc_net.memory_format = self.memory_format  # its backbone's input too
        self.bending_weight = float(bending_weight)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # no NaN check (it reads every batch's loss back from the device): a NaN loss makes the mean NaN
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run knows its best
        self.pose = torch.nn.ModuleDict({
            f"{split}_{which}": PoseSpread()
            for split in ("val", "test") for which in ("after", "identity", *self._partial_stages)
        })
        self.angle_slope = torch.nn.ModuleDict({split: AngleSlope() for split in ("val", "test")})
        self._first_val_batch: Tensor | None = None
        self.freeze_classifier = check_epoch_range(freeze_classifier, "model.freeze_classifier", "the classifier is frozen")
        if self.freeze_classifier and not self.transformer.loc_nets:
            first, end = self.freeze_classifier
            log.warning(
                f"model.freeze_classifier=[{first:g}, {end:g}] is ignored: model.transform=none has no "
                "transformer to learn while the classifier is frozen, so the classifier trains in every epoch "
                "(set model.freeze_classifier=null to silence this; a sweep may keep one curriculum for all models)."
            )
            self.freeze_classifier = None
        self.stage_start = check_stage_start(stage_start, len(self.transformer.stages))
        self.oracle_epochs = _check_oracle_pose(oracle_pose)
        self._compiled = False
        self._losses = LossWatch()
        if self.oracle_epochs and not self.transformer.loc_nets:
            raise SettingError(
                f"model.oracle_pose={_setting_text(oracle_pose)} trains the transformer from the true pose, but "
                "model.transform=none has no transformer; choose a transform (e.g. model.transform=[similarity,tps]) "
                "or set model.oracle_pose=false."
            )

    def setup(self, stage: str) -> None:
        """Compile the networks (``compile``) once, before the first fit, validation or test."""
        options = self.hparams.compile
        if options and not self._compiled:
            self._compiled = compile_networks(
                [*self.transformer.loc_nets, self.classifier], dict(options) if isinstance(options, Mapping) else None
            )

    def on_fit_start(self) -> None:
        first, end = self.freeze_classifier or (0, 0)
        last = self.trainer.max_epochs
        if last is not None and 0 <= last and first < last < end:
            log.warning(
                f"model.freeze_classifier=[{first:g}, {end:g}] outlasts the run (trainer.max_epochs={last}): the "
                f"classifier stays frozen from epoch {first:g} to the end and never learns the distorted digits. For a "
                f"short schedule shorten the range too, e.g. model.freeze_classifier=[{first:g},"
                f"{max(first + 1, last - 1):g}], or set model.freeze_classifier=null."
            )
        late = [index for index, start in enumerate(self.stage_start or ()) if last is not None and 0 <= last <= start]
        if late:
            log.warning(
                f"model.stage_start={list(self.stage_start)} starts stage {late[0]} at or after the run's end "
                f"(trainer.max_epochs={last}): its loc-net never learns and the stage keeps its initial map. Start it "
                f"earlier, e.g. model.stage_start[{late[0]}]={max(0, last - 1)}, or set model.stage_start=null."
            )

    @property
    def pretrained(self) -> bool:
        """Whether every loc-net backbone started from pretrained weights (``False`` without a loc-net)."""
        loc_nets = self.transformer.loc_nets
        return bool(loc_nets) and all(loc_net.pretrained for loc_net in loc_nets)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` for images ``(N, C, H, W)`` in ``[0, 1]``."""
        self._check_images(images)
        return self.classify(self.transformer(images))

    def _check_images(self, images: Tensor) -> None:
        channels = self.hparams.in_channels
        if images.dim() != 4 or images.shape[1] != channels or not images.is_floating_point():
            raise SettingError(
                f"The model takes float images (N, C, H, W) with C = model.in_channels = {channels}, got a "
                f"{images.dtype} tensor of shape {tuple(images.shape)}. Pass a batch of {channels}-channel "
                f"images in [0, 1] (add the batch axis with images[None], convert uint8 with images / 255), "
                "or train a model with the matching model.in_channels."
            )

    def classify(self, warped: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` for warped images ``(N, C, H', W')``."""
        return self.classifier(warped.contiguous(memory_format=self.memory_format))

    def _localize(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every stage's parameters and the sampling grid ``(N, H', W', 2)`` for ``images``."""
        self._check_images(images)
        params = self.transformer.localize(images)
        return params, self.transformer.grid(params, images)

    def _step(self, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Logits, every stage's parameters and the sampling grid ``(N, H', W', 2)``."""
        params, grid = self._localize(images)
        return self.classify(self.transformer.sample(images, grid)), params, grid

    def training_step(self, batch: tuple, batch_idx: int) -> Tensor:
        images, labels, *extras = batch
        self._hold_in_their_epochs()
        if self._told_the_pose:
            logits, params, pose_error = self._oracle_step(images, extras[0] if extras else {})
            self.log("train/pose_error", pose_error, on_step=True, on_epoch=False)
            loss = F.cross_entropy(logits, labels) + pose_error
        else:
            logits, params, _ = self._step(images)
            loss = F.cross_entropy(logits, labels)
        bending = self.transformer.bending(params) if self.bending_weight else None
        if bending is not None:
            bending = bending.mean()
            self.log("train/bending", bending, on_step=True, on_epoch=False)
            loss = loss + self.bending_weight * bending
        self._losses.record(loss, self.current_epoch, self.global_step)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _oracle_step(self, images: Tensor, digit_map: dict[str, Tensor]) -> tuple[Tensor, list[Tensor], Tensor]:
        """Logits of the classifier on the transformer's output (no gradient to the transformer), every
        stage's parameters, and the transformer's mean squared distance from the exact inverse, digit px²."""
        if not digit_map:
            raise SettingError(
                f"model.oracle_pose={_setting_text(self.hparams.oracle_pose)} needs each training image's distortion, "
                "and these training batches carry none (data.distortion=none, or a data module without digit maps); "
                "train on a distortion (e.g. data.distortion=rts) or set model.oracle_pose=false."
            )
        params, grid = self._localize(images)
        batch, height, width = grid.shape[:3]
        output = self.transformer.compose([], (height, width), images[:1]).reshape(1, -1, 2)  # output pixels
        digit = to_digit(grid.reshape(batch, -1, 2), digit_map)
        pose_error = (digit - DIGIT_HALF_SIZE * output).square().sum(-1).nanmean()  # NaN: beyond a p map's horizon
        return self.classify(self.transformer.sample(images, grid.detach())), params, pose_error

    @property
    def _told_the_pose(self) -> bool:
        """Whether the transformer learns from the true pose in this epoch (``oracle_pose``)."""
        first, end = self.oracle_epochs or (0, 0)
        return first <= self.current_epoch < end

    def _hold_in_their_epochs(self) -> None:
        """Hold the classifier inside ``freeze_classifier`` and each stage's loc-net before its ``stage_start``
        (:mod:`stn.curriculum`); let them learn otherwise."""
        first, end = self.freeze_classifier or (0, 0)
        hold(self.classifier, first <= self.current_epoch < end)
        for loc_net, start in zip(self.transformer.loc_nets, self.stage_start or ()):
            hold(loc_net, self.current_epoch < start)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.is_last_batch or (batch_idx + 1) % self.trainer.log_every_n_steps == 0:
            self._raise_if_diverged()  # the logger fetches this step's values now: the device is in sync anyway

    def _raise_if_diverged(self) -> None:
        """Raise :class:`DivergedError` if a training loss so far was NaN or infinite (syncs the device)."""
        first = self._losses.first()
        if first is None:
            return
        loc_nets = self.transformer.loc_nets
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = callback.last_model_path if callback else ""  # named before it is written: keep it only once it is
        raise diverged_error(
            *first, lr=self.optimizer_config.get("lr"), lr_mults=[net.lr_mult for net in loc_nets],
            checkpoint=last if last and os.path.isfile(last) else "",
        )

    def _eval_step(self, batch: tuple, split: str, acc: MulticlassAccuracy, mean_loss: MeanMetric) -> None:
        images, labels, *extras = batch
        logits, params, grid = self._step(images)
        mean_loss(F.cross_entropy(logits, labels), weight=labels.numel())
        acc(logits, labels)
        if extras and extras[0]:
            self._update_pose(images, params, grid, extras[0], split)

    @property
    def _partial_stages(self) -> list[str]:
        """``stage1`` ... ``stage<n-1>`` for a transformer of ``n`` stages: the poses measured after its first
        stages alone (``[]`` for one stage or none)."""
        return [f"stage{index}" for index in range(1, len(self.transformer.stages))]

    def _update_pose(
        self, images: Tensor, params: list[Tensor], grid: Tensor, digit_map: dict[str, Tensor], split: str
    ) -> None:
        """Fit the similarity from output pixels to the upright digit (inside its frame), after the transformer,
        after each of its first stages alone and for the identity, over the images whose output (after the
        whole transformer) shows the digit (the others are lost)."""
        batch, height, width = grid.shape[:3]
        identity = self.transformer.compose([], (height, width), images)
        output = identity[:1].reshape(1, -1, 2)  # output pixel positions, normalised
        partial = [(name, self.transformer.compose(params[:index], (height, width), images))
                   for index, name in enumerate(self._partial_stages, start=1)]
        digits = {which: to_digit(sampled.reshape(batch, -1, 2).float(), digit_map)
                  for which, sampled in (("after", grid), ("identity", identity), *partial)}
        weights = {which: frame_weights(digit) for which, digit in digits.items()}
        keep = weights["after"].sum(1) >= MIN_READ
        fits = {which: fit_similarity(output.float(), digit, weights[which]) for which, digit in digits.items()}
        for which, fit in fits.items():
            self.pose[f"{split}_{which}"].update(fit, keep)
        self.angle_slope[split].update(fits["after"]["angle"][keep], fits["identity"]["angle"][keep])

    def _log_pose(self, split: str) -> None:
        after, identity = self.pose[f"{split}_after"], self.pose[f"{split}_identity"]
        if int(after.count + after.lost) == 0:  # no batch carried digit maps
            return
        drawn = identity.compute()
        report = pose_report(after.compute(), drawn)
        if "angle_left" in report:  # a distortion that turns the digits: how the angle left follows the one drawn
            report.update({name: float(value) for name, value in self.angle_slope[split].compute().items()})
        for name, value in report.items():
            self.log(f"{split}/pose/{name}", value)
        for stage in self._partial_stages:
            partial = self.pose[f"{split}_{stage}"]
            for name, value in pose_report(partial.compute(), drawn).items():
                if name.endswith("_left"):
                    self.log(f"{split}/pose/{stage}/{name}", value)
            partial.reset()
        after.reset()
        identity.reset()
        self.angle_slope[split].reset()

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        if batch_idx == 0:
            self._first_val_batch = batch[0].detach()
        self._eval_step(batch, "val", self.val_acc, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", acc, prog_bar=True)
        self.val_acc.reset()
        self.val_loss.reset()
        self._log_pose("val")
        if not self.trainer.sanity_checking and self._first_val_batch is not None:
            self.val_acc_best(acc)
            self.log("val/acc_best", self.val_acc_best.compute())
            self._log_loc_net_health(self._first_val_batch)
            self._log_images(self._first_val_batch[: self.hparams.num_log_images])

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc, self.test_loss)

    def on_test_epoch_end(self) -> None:
        acc = self.test_acc.compute()
        self.log("test/loss", self.test_loss.compute())
        self.log("test/acc", acc)
        self.log("test/error", 100.0 * (1.0 - acc))
        self.test_acc.reset()
        self.test_loss.reset()
        self._log_pose("test")

    @torch.no_grad()
    def _log_loc_net_health(self, images: Tensor) -> None:
        """``loc/stage<k>/param_std`` and ``loc/stage<k>/dead_units`` on ``images``; warns on a collapse."""
        for index, health in enumerate(loc_net_health(self.transformer, images), start=1):
            for name, value in health.items():
                self.log(f"loc/stage{index}/{name}", value)
            if health.get("dead_units", 0.0) == 1.0:
                log.warning(
                    "Every hidden unit of the loc-net head of stage %d is dead (zero on every validation image): "
                    "it predicts one transform for all images and cannot learn any more. Set "
                    "model.loc_net.head_norm=true (a LayerNorm keeps about half the units firing), lower the "
                    "stage's lr_mult (model.loc_net.lr_mult or model.stage_loc_nets[%d].lr_mult, now %s) or "
                    "model.optimizer.lr, or set model.loc_net.hidden=0.",
                    index, index - 1, self.transformer.loc_nets[index - 1].lr_mult,
                )

    def _log_images(self, images: Tensor) -> None:
        every = self.hparams.log_images_every_n_epochs
        writer = getattr(self.logger, "experiment", None)
        if not every or not hasattr(writer, "add_image"):
            return
        last_epoch = self.current_epoch + 1 == self.trainer.max_epochs
        if (self.current_epoch + 1) % every and not last_epoch:
            return
        for tag, image in self.visualize(images).items():
            writer.add_image(f"images/{tag}", image, global_step=self.global_step)

    @torch.no_grad()
    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        """TensorBoard panels for images ``(N, C, H, W)``: see :func:`stn.viz.transformer_panels`."""
        return transformer_panels(self.transformer, images)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        scheduler = self._scheduler(optimizer)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimiser over :meth:`param_groups`."""
        return build_optimizer(self.optimizer_config, self.param_groups())

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: classifier, loc-net head, loc-net backbone.

        The loc-net head runs at ``lr * loc_net.lr_mult`` without weight decay (decay would pull
        its bias, the identity control points, towards zero); the backbone at
        ``lr * loc_net.lr_mult * loc_net.backbone_lr_mult``. Stages whose loc-nets learn at different
        rates (``stage_loc_nets``) get a head and a backbone group each, ``loc_head/stage<k>`` and
        ``loc_backbone/stage<k>``. Frozen parameters are left out.
        """
        lr = float(self.optimizer_config["lr"])
        groups = [{"name": "classifier", "params": list(self.classifier.parameters()), "lr": lr}]
        loc_nets = self.transformer.loc_nets
        shared = len({(net.lr_mult, net.backbone_lr_mult) for net in loc_nets}) == 1
        stages = [("", loc_nets)] if shared else [(f"/stage{k}", [net]) for k, net in enumerate(loc_nets, start=1)]
        for suffix, nets in stages:
            rate = lr * nets[0].lr_mult
            heads = [p for net in nets for p in net.head.parameters()]
            groups.append({"name": f"loc_head{suffix}", "params": heads, "lr": rate, "weight_decay": 0.0})
            backbone = [p for net in nets for p in net.backbone.parameters() if p.requires_grad]
            if backbone:
                groups.append(
                    {"name": f"loc_backbone{suffix}", "params": backbone, "lr": rate * nets[0].backbone_lr_mult}
                )
        return groups

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        if self.scheduler_config is None:
            return None
        return build_scheduler(self.scheduler_config, optimizer, int(self.trainer.estimated_stepping_batches))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._raise_if_diverged()  # never save the weights of a diverged run
        checkpoint["pretrained"] = self.pretrained

    def check_checkpoint(self, checkpoint: dict[str, Any], path: str) -> None:
        """Raise a one-paragraph error unless ``checkpoint`` (read from ``path``) fits this model."""
        check_architecture(checkpoint["state_dict"], self, path)

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> STNClassifier:
        """Rebuild a trained model from a checkpoint without fetching backbone weights again."""
        checkpoint = load_checkpoint(path, map_location)
        if "hyper_parameters" not in checkpoint:
            raise CorruptInputError(f"{path} holds no model settings (hyper_parameters): it was not written by scripts/train.py.")
        hparams = dict(checkpoint["hyper_parameters"])
        hparams["loc_net"] = {**(hparams.get("loc_net") or {}), "weights": None}
        if hparams.get("stage_loc_nets") is not None:
            hparams["stage_loc_nets"] = [{**(stage or {}), "weights": None} for stage in hparams["stage_loc_nets"]]
        _drop_removed_settings(hparams, path)
        with random_backbones_replaced():  # the checkpoint's weights follow
            model = cls(**hparams)
        model.check_checkpoint(checkpoint, path)
        model.load_state_dict(checkpoint["state_dict"])
        for loc_net in model.transformer.loc_nets:
            loc_net.pretrained = bool(checkpoint.get("pretrained", False))
        return model


def _drop_removed_settings(hparams: dict[str, Any], path: str) -> None:
    """Remove from a checkpoint's ``hparams`` the settings of refuted probes that checkpoints written until
    commit d8d173e hold (``passes``, ``equivariance``, ``turned_negatives``; docs/research_log.md), where they
    are off; a checkpoint of a run that used one is refused."""
    passes = hparams.pop("passes", 1)
    used = [] if passes == 1 or (isinstance(passes, (list, tuple)) and set(passes) <= {1}) else [f"passes={passes}"]
    for name in ("equivariance", "turned_negatives"):
        weight = (hparams.pop(name, None) or {}).get("weight", 0.0)
        used += [f"{name}.weight={weight}"] if weight else []
    if used:
        raise SettingError(
            f"{path} was trained with model.{', model.'.join(used)}, a probe since removed (docs/research_log.md). "
            "Re-test it from a checkout of the commit it was trained with (git checkout d8d173e or earlier)."
        )


def _check_output_size(size: Sequence[int] | None) -> None:
    if size is None:
        return
    if isinstance(size, str) or len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        raise SettingError(
            f"model.output_size must be [H, W] with two positive integers (the size the warped image is "
            f"sampled at), got {size!r}. Set e.g. model.output_size=[28,28], or null for the input size."
        )


def _check_oracle_pose(oracle_pose: bool | Sequence[float]) -> tuple[float, float] | None:
    """``model.oracle_pose`` as the training epochs ``(first, end)`` told the pose; ``None``: never."""
    if isinstance(oracle_pose, bool):
        return (0.0, math.inf) if oracle_pose else None
    return check_epoch_range(oracle_pose, "model.oracle_pose", "the transformer learns from the true pose (or true: "
                             "every epoch, false: never)")


def _setting_text(value: Any) -> str:
    """A setting's value as written on the command line (``true``, ``[1, 5]``)."""
    return str(value).lower() if isinstance(value, bool) else str(list(value))
