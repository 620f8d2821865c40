"""Spatial transformer: a chain of warp stages (each a loc-net + a map) composed into ONE sampling grid.

``transform`` names one stage kind or a list of them, applied in order:

- ``"tps"``: the loc-net predicts ``source_points`` ``(N, T, 2)`` for a ``rows`` x ``cols`` layout
  of target points, and :class:`~stn.tps.TPSGridGen` turns them into a sampling grid.
- ``"affine"``: the loc-net predicts ``theta`` ``(N, 2, 3)`` for :func:`F.affine_grid`.
- ``"similarity"``: the loc-net predicts ``(angle, log_scale, shift_x, shift_y)`` ``(N, 4)``, a rotation,
  isotropic scale and shift (the pose of an RTS digit), turned into ``theta``.
- ``"none"``: no stage, no loc-net; the identity grid (a plain resample to ``output_size``), so a
  baseline classifier shares every other line of code with the STN.

With several stages, e.g. ``["similarity", "tps"]``, stage ``k``'s loc-net reads the view that stages
``1..k-1`` produce (sampled straight from the input at that loc-net's view size) and predicts a map of
that view. The maps compose into one grid on the input, ``g_1(g_2(...g_K(p)))``: an affine map of TPS
points is exact, so the input is resampled once however many stages there are.

Every stage starts at the identity: an untrained transformer returns its input (resampled to
``output_size`` when that differs from the input size).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.errors import SettingError
from stn.localization import LocalizationNet
from stn.tps import TPSGridGen, grid_points

__all__ = ["SpatialTransformer", "TransformStage", "TRANSFORMS", "similarity_theta", "affine_points", "stage_kinds"]

TRANSFORMS = ("tps", "affine", "similarity", "none")
STAGE_KINDS = ("tps", "affine", "similarity")
IDENTITY_THETA = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def similarity_theta(params: Tensor) -> Tensor:
    """``(N, 4)`` ``(angle, log_scale, shift_x, shift_y)`` -> ``theta`` ``(N, 2, 3)`` (output -> input)."""
    angle, log_scale, shift_x, shift_y = params.unbind(-1)
    scale = log_scale.exp()
    cos, sin = scale * angle.cos(), scale * angle.sin()
    return torch.stack([torch.stack([cos, -sin, shift_x], -1), torch.stack([sin, cos, shift_y], -1)], 1)


def affine_points(theta: Tensor, points: Tensor) -> Tensor:
    """Points ``(N, P, 2)`` mapped through ``theta`` ``(N, 2, 3)``: ``theta[:, :, :2] @ p + theta[:, :, 2]``."""
    return points @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]


class TransformStage(nn.Module):
    """One warp of the chain: a loc-net and the map from this stage's output frame to its input frame.

    Args:
        kind: ``"tps"``, ``"affine"`` or ``"similarity"``.
        loc_net: keyword arguments of :class:`~stn.localization.LocalizationNet` (not ``initial``).
        target_points: ``(T, 2)`` TPS target layout (used by ``tps``).
        size: default output size of the TPS grid generator.
        align_corners: the ``affine_grid`` convention.
    """

    def __init__(self, kind: str, loc_net: dict, target_points: Tensor, size: tuple[int, int], align_corners: bool):
        super().__init__()
        self.kind = kind
        self.align_corners = align_corners
        initial = {"tps": target_points, "affine": IDENTITY_THETA, "similarity": torch.zeros(4)}[kind]
        self.loc_net = LocalizationNet(initial, **loc_net)
        self.grid_gen = TPSGridGen(target_points, size=size, align_corners=align_corners) if kind == "tps" else None

    def theta(self, params: Tensor) -> Tensor:
        """``(N, 2, 3)`` affine matrix of ``affine`` / ``similarity`` parameters."""
        return similarity_theta(params) if self.kind == "similarity" else params

    def grid(self, params: Tensor, size: tuple[int, int]) -> Tensor:
        """Sampling grid ``(N, H, W, 2)`` of this stage alone."""
        if self.kind == "tps":
            return self.grid_gen(params, size=size)
        theta = self.theta(params)
        return F.affine_grid(theta, [theta.shape[0], 1, *size], align_corners=self.align_corners)

    def map_points(self, params: Tensor, points: Tensor) -> Tensor:
        """Points ``(N, P, 2)`` of this stage's output frame -> its input frame ``(N, P, 2)``."""
        if self.kind == "tps":
            return self.grid_gen.warp_points(points, params)
        return affine_points(self.theta(params).to(points.dtype), points)


class SpatialTransformer(nn.Module):
    """Warp images with a transform predicted from the images themselves.

    Args:
        transform: a stage kind (``"tps"``, ``"affine"``, ``"similarity"``), a list of them applied in
            order, or ``"none"``.
        loc_net: keyword arguments of :class:`~stn.localization.LocalizationNet` (not ``initial``),
            shared by every stage's loc-net.
        stage_loc_nets: one mapping per stage that overrides ``loc_net`` for that stage's loc-net (``{}``
            or ``None``: the shared settings), e.g. a wider backbone for the first stage only;
            ``None``: every stage uses ``loc_net``. A stage may set its own ``lr_mult`` and ``backbone_lr_mult``.
        rows, cols, margin: the TPS target-point layout (:func:`~stn.tps.grid_points`); without a
            TPS stage the same layout is only used to draw control points.
        output_size: ``(H', W')`` of the warped image; ``None`` keeps the input size.
        align_corners: the ``affine_grid`` / ``grid_sample`` convention, used everywhere.
        padding_mode: ``grid_sample`` padding for reads outside the input.
        detach_views: each later stage's loc-net reads the view of the stages before it as data: no
            gradient flows through that view into the earlier stages, which learn from the final grid
            alone. The backward then skips the later loc-nets' input gradients (and, with frozen
            backbones, their backbones altogether). ``False``: every stage also learns from how its view
            serves the loc-nets after it.
    """

    def __init__(
        self,
        transform: str | Sequence[str] = "tps",
        loc_net: dict | None = None,
        rows: int = 4,
        cols: int = 4,
        margin: float = 0.0,
        output_size: tuple[int, int] | None = None,
        align_corners: bool = False,
        padding_mode: str = "zeros",
        stage_loc_nets: Sequence[Mapping | None] | None = None,
        detach_views: bool = False,
    ):
        super().__init__()
        kinds = stage_kinds(transform)
        settings = _stage_loc_net_settings(dict(loc_net or {}), stage_loc_nets, kinds)
        self.transform = "+".join(kinds) or "none"
        self.output_size = None if output_size is None else (int(output_size[0]), int(output_size[1]))
        self.align_corners = bool(align_corners)
        self.padding_mode = padding_mode
        self.detach_views = bool(detach_views)
        target = grid_points(rows, cols, margin)
        self.register_buffer("target_points", target, persistent=False)
        size = self.output_size or (28, 28)
        self.stages = nn.ModuleList(
            TransformStage(kind, stage_settings, target, size, self.align_corners)
            for kind, stage_settings in zip(kinds, settings)
        )

    @property
    def loc_nets(self) -> list[LocalizationNet]:
        """The loc-net of every stage, in order (empty for ``none``)."""
        return [stage.loc_net for stage in self.stages]

    def out_size(self, images: Tensor) -> tuple[int, int]:
        """``(H', W')`` of the warped version of ``images`` ``(N, C, H, W)``."""
        return self.output_size or (images.shape[-2], images.shape[-1])

    def localize(self, images: Tensor) -> list[Tensor]:
        """Every stage's parameters for ``images`` ``(N, C, H, W)``.

        Returns:
            one tensor per stage: ``(N, T, 2)`` source points (``tps``), ``(N, 2, 3)`` theta
            (``affine``), ``(N, 4)`` angle, log-scale, shift (``similarity``); ``[]`` for ``none``.
        """
        params: list[Tensor] = []
        for stage in self.stages:
            view = images
            if params:
                view_size = stage.loc_net.input_size or self.out_size(images)
                with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_views):
                    view = self.sample(images, self.compose(params, view_size, images))
            params.append(stage.loc_net(view))
        return params

    def compose(self, params: list[Tensor], size: tuple[int, int], images: Tensor) -> Tensor:
        """Sampling grid ``(N, H, W, 2)`` on the input of the first ``len(params)`` stages composed.

        The grid maths runs in float32 (float64 for float64 parameters), also under autocast, where
        the loc-nets' parameters arrive in 16 bits: a bf16 grid would misplace pixels by up to 1/128 of
        the image.
        """
        with torch.autocast(images.device.type, enabled=False):
            return self._compose([p.to(torch.promote_types(p.dtype, torch.float32)) for p in params], size, images)

    def _compose(self, params: list[Tensor], size: tuple[int, int], images: Tensor) -> Tensor:
        batch = images.shape[0]
        if not params:
            theta = IDENTITY_THETA.to(images).expand(batch, 2, 3)
            return F.affine_grid(theta, [batch, images.shape[1], *size], align_corners=self.align_corners)
        last = len(params) - 1
        stages = list(self.stages)
        grid = stages[last].grid(params[last], size)
        points = grid.reshape(batch, -1, 2)
        for stage, stage_params in zip(reversed(stages[:last]), reversed(params[:last])):
            points = stage.map_points(stage_params, points)
        return points.view(batch, *size, 2)

    def grid(self, params: list[Tensor], images: Tensor) -> Tensor:
        """Sampling grid ``(N, H', W', 2)`` in the input frame for ``params`` from :meth:`localize`."""
        return self.compose(params, self.out_size(images), images)

    def control_points(self, params: list[Tensor], batch: int) -> Tensor:
        """Where the target-point layout is read from in the input frame, ``(N, T, 2)``.

        The layout of the output mapped through every stage: for a single ``tps`` stage its predicted
        source points; for ``affine`` the layout mapped through ``theta``; for ``none`` the layout.
        """
        points = self.target_points.expand(batch, -1, -1)
        for stage, stage_params in zip(reversed(list(self.stages)), reversed(params)):
            points = stage.map_points(stage_params, points)
        return points

    def bending(self, params: list[Tensor]) -> Tensor | None:
        """Bending energy ``(N,)`` summed over the TPS stages (each of its own map); ``None`` without one."""
        energies = [
            stage.grid_gen.bending_energy(stage_params)
            for stage, stage_params in zip(self.stages, params) if stage.kind == "tps"
        ]
        return torch.stack(energies).sum(0) if energies else None

    def sample(self, images: Tensor, grid: Tensor) -> Tensor:
        """Read ``images`` ``(N, C, H, W)`` at ``grid`` ``(N, H', W', 2)`` -> ``(N, C, H', W')``."""
        return F.grid_sample(
            images, grid.to(images.dtype), mode="bilinear", padding_mode=self.padding_mode,
            align_corners=self.align_corners,
        )

    def forward(self, images: Tensor) -> Tensor:
        """Warped images ``(N, C, H', W')`` for ``images`` ``(N, C, H, W)``."""
        return self.sample(images, self.grid(self.localize(images), images))


def stage_kinds(transform: str | Sequence[str]) -> list[str]:
    """The stages of ``model.transform`` in order (``[]`` for ``"none"``); raises for an unknown one."""
    kinds = [transform] if isinstance(transform, str) else list(transform)
    if kinds == ["none"]:
        return []
    unknown = [kind for kind in kinds if kind not in STAGE_KINDS]
    if unknown or not kinds:
        raise SettingError(
            f"Unknown transform {transform!r}. Set model.transform to one of {', '.join(TRANSFORMS)}, or to "
            f"a list of stages applied in order, e.g. model.transform=[similarity,tps] ('none' only alone)."
        )
    return kinds


def _stage_loc_net_settings(
    loc_net: dict, stage_loc_nets: Sequence[Mapping | None] | None, kinds: list[str]
) -> list[dict]:
    """Each stage's loc-net keyword arguments: ``loc_net`` updated by that stage's overrides."""
    accepted = set(inspect.signature(LocalizationNet).parameters) - {"initial"}
    unknown = sorted(set(loc_net) - accepted)
    if unknown:
        raise SettingError(
            f"model.loc_net sets {', '.join(unknown)}, which a loc-net does not take. Remove it or fix its name; "
            f"model.loc_net may set {', '.join(sorted(accepted))}."
        )
    if stage_loc_nets is None:
        return [dict(loc_net) for _ in kinds]
    overrides = [dict(stage or {}) for stage in stage_loc_nets]
    if len(overrides) != len(kinds):
        raise SettingError(
            f"model.stage_loc_nets holds {len(overrides)} entries and model.transform={kinds or 'none'} has "
            f"{len(kinds)} stages: give one mapping per stage ({{}} keeps model.loc_net for that stage), e.g. "
            "model.stage_loc_nets=[{backbone: resnet18, feature_node: layer1},{}], or null for model.loc_net "
            "everywhere."
        )
    for index, override in enumerate(overrides):
        unknown = sorted(set(override) - accepted)
        if unknown:
            raise SettingError(
                f"model.stage_loc_nets[{index}] sets {', '.join(unknown)}, which a loc-net does not take. Remove it; "
                f"a stage's mapping may set {', '.join(sorted(accepted))}."
            )
    return [{**loc_net, **override} for override in overrides]
