"""``model.loc_net.weights=pose``: the cached pose-pretrained backbone file, made once per setting and
equal to what :func:`stn.pretraining.pretrain_pose` returns for the same settings."""

from __future__ import annotations

import pytest
import torch

from stn.errors import SettingError
from stn.localization import LocalizationNet
from stn.pose_weights import pose_weights_file, with_pose_weights
from stn.pretraining import pretrain_pose

SETTINGS = {"distortion": "rts", "epochs": 1, "batch_size": 16, "lr": 1e-3, "hidden": 8, "seed": 3, "digits": 48}
LOC_NET = {"backbone": "shufflenet_v2_x0_5", "weights": "pose", "feature_node": "stage2", "input_size": 16}


def digits() -> torch.Tensor:
    """``(64, 1, 28, 28)`` uint8: a bright square per image at a seeded place."""
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    corners = torch.randint(4, 16, (64, 2), generator=torch.Generator().manual_seed(0))
    for image, (row, col) in zip(images, corners.tolist()):
        image[0, row : row + 8, col : col + 8] = 255
    return images


class Calls:
    """``train_images`` that counts how often it was asked."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> torch.Tensor:
        self.count += 1
        return digits()


def test_pose_weights_are_made_once_and_equal_pretrain_pose(tmp_path):
    calls = Calls()
    model = {"transform": ["similarity", "tps"], "loc_net": LOC_NET, "stage_loc_nets": None}
    resolved = with_pose_weights(model, SETTINGS, tmp_path, calls)
    path = resolved["loc_net"]["weights"]
    assert path == str(pose_weights_file("shufflenet_v2_x0_5", "stage2", (16, 16), SETTINGS, tmp_path)) and calls.count == 1
    assert {key: value for key, value in resolved["loc_net"].items() if key != "weights"} == {
        key: value for key, value in LOC_NET.items() if key != "weights"}
    cached = torch.load(path, weights_only=True)
    options = {key: value for key, value in SETTINGS.items() if key != "digits"}
    direct = pretrain_pose("shufflenet_v2_x0_5", "stage2", digits()[:48], input_size=(16, 16), **options)
    assert cached.keys() == direct.keys() and all(torch.equal(cached[key], direct[key]) for key in direct)
    # a second run finds the file and does not read the digits again
    assert with_pose_weights(model, SETTINGS, tmp_path, calls)["loc_net"]["weights"] == path and calls.count == 1
    net = LocalizationNet(torch.zeros(4), "shufflenet_v2_x0_5", path, "stage2", 16)
    assert net.pretrained and torch.equal(net.backbone.state_dict()["body.conv1.0.weight"], direct["conv1.0.weight"])
    assert not list(tmp_path.glob(".*.tmp")), "the partial file was renamed into place"


def test_every_setting_and_view_names_its_own_file(tmp_path):
    base = pose_weights_file("shufflenet_v2_x0_5", "stage2", (16, 16), SETTINGS, tmp_path)
    others = [pose_weights_file("shufflenet_v2_x0_5", "stage2", (16, 16), {**SETTINGS, key: value}, tmp_path)
              for key, value in (("epochs", 2), ("lr", 2e-3), ("seed", 4), ("digits", None), ("distortion", "r"),
                                 ("hidden", 16), ("batch_size", 32), ("backbone_dtype", "bfloat16"),
                                 ("channels_last", True))]
    others += [pose_weights_file("shufflenet_v2_x0_5", "stage3", (16, 16), SETTINGS, tmp_path),
               pose_weights_file("shufflenet_v2_x0_5", "stage2", (32, 32), SETTINGS, tmp_path),
               pose_weights_file("resnet18", "stage2", (16, 16), SETTINGS, tmp_path)]
    assert len({base, *others}) == 1 + len(others)
    assert base.name.startswith("shufflenet_v2_x0_5_stage2_16x16_rts_pose_") and base.parent == tmp_path


def test_each_stage_gets_the_file_of_its_own_backbone_and_view(tmp_path):
    calls = Calls()
    model = {"transform": ["similarity", "tps"], "loc_net": LOC_NET,
             "stage_loc_nets": [{"input_size": 24}, {}]}
    resolved = with_pose_weights(model, SETTINGS, tmp_path, calls)
    first, second = (stage["weights"] for stage in resolved["stage_loc_nets"])
    assert first == str(pose_weights_file("shufflenet_v2_x0_5", "stage2", (24, 24), SETTINGS, tmp_path))
    assert second == resolved["loc_net"]["weights"] != first and calls.count == 2
    assert resolved["stage_loc_nets"][0]["input_size"] == 24
    # a stage with weights of its own keeps them
    model = {"transform": "tps", "loc_net": LOC_NET, "stage_loc_nets": [{"weights": None}]}
    assert with_pose_weights(model, SETTINGS, tmp_path, calls)["stage_loc_nets"] == [{"weights": None}]


def test_no_loc_net_nothing_to_pretrain_and_a_pooled_or_unsized_loc_net_is_refused(tmp_path):
    def no_digits() -> torch.Tensor:
        raise AssertionError("nothing should be pretrained")

    model = {"transform": "none", "loc_net": LOC_NET}
    assert with_pose_weights(model, SETTINGS, tmp_path, no_digits) == model
    for missing in ("feature_node", "input_size"):  # the pretext pretrains the cut the loc-net reads, on its view
        model = {"transform": "tps", "loc_net": {**LOC_NET, missing: None}}
        with pytest.raises(SettingError, match=rf"model\.loc_net\.feature_node on a view of model\.loc_net\.input_size"):
            with_pose_weights(model, SETTINGS, tmp_path, no_digits)
    with pytest.raises(SettingError, match=r"scripts/train\.py makes"):
        LocalizationNet(torch.zeros(4), "shufflenet_v2_x0_5", "pose", "stage2", 16)
