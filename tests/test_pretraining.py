"""Offline loc-net pretraining (:mod:`stn.pretraining`): the pose targets in closed form, and what the pose
task trains, keeps and writes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import Tensor

import stn.data.distortions as D
from stn.errors import SettingError
from stn.localization import LocalizationNet
from stn.pretraining import pose_targets, pretrain_pose
from stn.tps import grid_points


def test_rts_pose_targets_are_the_drawn_angle_log_scale_and_shift_over_their_largest_values():
    params = D.sample_params("rts", 20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = pose_targets("rts", params)
    assert targets.shape == (20000, 4)
    low, high = math.log(0.7), math.log(1.2)
    # inverted by hand: angle over 45°, log-scale from the middle of [log 0.7, log 1.2] over half its width,
    # shift over the most room a 0.7-scaled 28-px frame leaves on the 42-px canvas, (42 - 19.6) / 2 = 11.2 px
    assert torch.allclose(targets[:, 0] * math.radians(45), params["angle"])
    assert torch.allclose(torch.exp(targets[:, 1] * (high - low) / 2 + (low + high) / 2), params["scale"])
    assert torch.allclose(targets[:, 2:] * 11.2, params["shift"])
    assert targets.abs().max() <= 1 and (targets.abs().amax(0) > 0.99).all()  # each part fills [-1, 1]


def test_r_pose_target_is_the_angle_over_90_degrees():
    params = D.sample_params("r", 1000, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(pose_targets("r", params), (params["angle"] / math.radians(90))[:, None])


@pytest.mark.parametrize("name", ["p", "e", "none"])
def test_a_distortion_without_a_pose_is_named(name):
    params = D.sample_params(name, 4, torch.Generator().manual_seed(0))
    with pytest.raises(SettingError, match=rf"distortion='{name}' has no pose.*distortion=rts.*task=classes"):
        pose_targets(name, params)


def test_pose_pretraining_trains_the_cut_keeps_the_rest_and_loads_as_loc_net_weights(tmp_path):
    digits = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 6:22, 12:16] = 255  # an upright bar: its turn is the pose
    state = pretrain_pose("shufflenet_v2_x0_5", "stage2", digits, "rts", (16, 16), epochs=1, batch_size=32, seed=3)
    torch.manual_seed(3)
    fresh = torchvision.models.shufflenet_v2_x0_5(weights=None).state_dict()
    assert set(state) == {key for key in fresh if not key.startswith("fc.")}  # the whole backbone, no head
    trained = [key for key in state if key.startswith(("conv1.", "stage2.")) and state[key].is_floating_point()]
    kept = [key for key in state if key.startswith(("stage3.", "stage4.", "conv5."))]
    assert trained and kept
    assert all(not torch.equal(state[key], fresh[key]) for key in trained if key.endswith("weight"))
    assert all(torch.equal(state[key], fresh[key]) for key in kept)  # beyond the cut: the seeded initialisation
    path = tmp_path / "pose.pth"
    torch.save(state, path)
    net = LocalizationNet(grid_points(4, 4), backbone="shufflenet_v2_x0_5", weights=str(path),
                          feature_node="stage2", input_size=16)
    assert net.pretrained
    loaded = net.backbone.state_dict()
    assert all(torch.equal(loaded[f"body.{key}"], state[key]) for key in trained)


LR, STEPS = 1e-3, 2


def pretexts_seen_by_the_first_convolution(
    monkeypatch: pytest.MonkeyPatch, seen: Callable[[Tensor, Tensor], object], **variants: dict
) -> tuple[dict[str, dict[str, Tensor]], list]:
    """``pretrain_pose`` of a bar digit (resnet18 at layer1, 16x16 views, ``STEPS`` steps at ``LR``, seed 3) once per
    ``variants`` entry (its extra keyword arguments); ``seen(input, output)`` of the backbone's first convolution is
    collected for every training step, in order. Returns ``({name: state_dict}, [seen values])``."""
    import stn.pretraining

    values: list = []

    def record(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
        if module.training:  # the head's size is probed in evaluation mode: not a training step
            values.append(seen(inputs[0], output))

    def hooked(*args, **kwargs):
        built = build(*args, **kwargs)
        next(module for module in built[0].modules() if isinstance(module, torch.nn.Conv2d)).register_forward_hook(record)
        return built

    build = stn.pretraining.build_backbone
    monkeypatch.setattr(stn.pretraining, "build_backbone", hooked)
    digits = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 6:22, 12:16] = 255
    states = {name: pretrain_pose("resnet18", "layer1", digits, "rts", (16, 16), epochs=1, batch_size=32, lr=LR, seed=3,
                                  **options) for name, options in variants.items()}
    return states, values


def test_a_bfloat16_pretext_moves_the_weights_as_the_float32_one_within_adams_step(monkeypatch):
    """pose_pretraining.backbone_dtype=bfloat16 runs the cut backbone's convolutions in bfloat16 (autocast) and
    keeps float32 weights; from the same seed its weights stay within Adam's step bound of the float32 pretext's
    (every Adam step moves a weight by at most about lr, so two runs of k steps differ by at most 2 k lr) while
    differing from them (the rounding reached the gradients)."""
    states, seen = pretexts_seen_by_the_first_convolution(
        monkeypatch, lambda _, output: output.dtype,
        float32={"backbone_dtype": "float32"}, bfloat16={"backbone_dtype": "bfloat16"})
    assert seen == [torch.float32] * STEPS + [torch.bfloat16] * STEPS
    trained = [key for key in states["float32"] if key.startswith(("conv1.", "layer1.")) and key.endswith("weight")]
    assert all(states["bfloat16"][key].dtype == torch.float32 for key in trained)
    gaps = [float((states["bfloat16"][key] - states["float32"][key]).abs().max()) for key in trained]
    assert max(gaps) <= 2 * STEPS * LR * 1.01 and max(gaps) > 0


def test_an_unknown_pretext_dtype_names_the_setting():
    digits = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(SettingError, match=r"pose_pretraining.backbone_dtype='fp8'.*bfloat16"):
        pretrain_pose("resnet18", "layer1", digits, "rts", (16, 16), backbone_dtype="fp8")


def test_a_channels_last_pretext_reads_channels_last_views_and_learns_what_the_contiguous_one_does(monkeypatch):
    """pose_pretraining.channels_last: the backbone's convolutions read channels-last tensors; from the same seed
    the weights (handed back contiguous) equal the contiguous pretext's up to the kernels' summation order: all but
    a few within 1e-6, none further than Adam's step bound (2 k lr after k steps: a near-zero gradient whose sign the
    rounding flips)."""
    states, seen = pretexts_seen_by_the_first_convolution(
        monkeypatch, lambda view, _: view.is_contiguous(memory_format=torch.channels_last),
        contiguous={"channels_last": False, "backbone_dtype": "float32"},
        channels_last={"channels_last": True, "backbone_dtype": "float32"})
    assert seen == [False] * STEPS + [True] * STEPS
    trained = [key for key in states["contiguous"] if key.startswith(("conv1.", "layer1.")) and key.endswith("weight")]
    assert all(value.is_contiguous() for value in states["channels_last"].values())
    gaps = torch.cat([(states["channels_last"][key] - states["contiguous"][key]).abs().flatten() for key in trained])
    assert float((gaps > 1e-6).float().mean()) < 1e-3 and float(gaps.max()) <= 2 * STEPS * LR * 1.01
