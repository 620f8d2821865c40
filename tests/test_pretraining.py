"""Offline loc-net pretraining (:mod:`stn.pretraining`): the pose targets in closed form, and what the pose
task trains, keeps and writes."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

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
