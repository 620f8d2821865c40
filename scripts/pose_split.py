"""Split the pose a transformer leaves: python scripts/pose_split.py ckpt_path=<ckpt> [digits=2000 draws=5]

Within a digit (over its draws): the distortion the transformer did not undo. Between digits: the pose
of its own the transformer gives each digit (e.g. turning slanted handwriting upright). stn.pose_split.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from stn.checkpoints import run_info  # noqa: E402
from stn.cli import report_user_errors  # noqa: E402
from stn.data.mnist_files import read_split, resolve_root  # noqa: E402
from stn.errors import SettingError  # noqa: E402
from stn.module import STNClassifier  # noqa: E402
from stn.pose_split import SPLIT_DISTORTIONS, pose_split  # noqa: E402
from stn.run_folders import register_resolvers  # noqa: E402

register_resolvers()

CLASS_COLUMNS = ("angle_within_left", "angle_within_slope", "log_scale_within_left")


def _settings(cfg: DictConfig) -> tuple[str, int]:
    distortion = cfg.distortion or run_info(cfg.ckpt_path)["config"]["data"]["distortion"]
    if distortion not in SPLIT_DISTORTIONS:
        raise SettingError(
            f"distortion={distortion} has no pose to split: the split measures what a transformer leaves of "
            f"a drawn distortion. Pass distortion= one of {', '.join(SPLIT_DISTORTIONS)}."
        )
    if cfg.draws < 2 or cfg.digits < 2:
        raise SettingError(
            f"draws={cfg.draws}, digits={cfg.digits}: the split compares each digit's draws with each other "
            "and the digits with each other, so it needs at least 2 of each. Pass e.g. draws=5 digits=2000."
        )
    return distortion, int(cfg.digits)


def _table(report: dict[str, float]) -> str:
    lines = [
        f"{int(report['digits'])} digits x {int(report['draws'])} draws (lost {report['lost']:.3f})",
        "| spread | drawn | within a digit (left) | between digits (left) |",
        "|---|---|---|---|",
    ]
    for name, unit in (("angle", "°"), ("log_scale", ""), ("shift", " px")):
        if f"{name}_drawn" not in report:
            continue
        cells = [f"{report[f'{name}_drawn']:.3g}{unit}"]
        for part in ("within", "between"):
            ratio = report.get(f"{name}_{part}_left")
            cells.append(f"{report[f'{name}_{part}']:.3g}{unit}" + (f" ({ratio:.2f})" if ratio is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "angle_within_slope" in report:
        lines.append(f"angle slope within digits {report['angle_within_slope']:.2f}; "
                     f"correlation of each digit's angle with its ink slant {report['angle_slant_r']:.2f}")
        lines.append(f"ink slant spread: upright digits {report['slant_upright']:.3f}, "
                     f"the transformer's outputs {report['slant_after']:.3f}")
        lines.append(f"angle from upright, median: drawn {report['angle_abs_median_drawn']:.1f}°, after "
                     f"{report['angle_abs_median']:.1f}°; outputs turned over 30°: {100 * report['angle_over_30']:.1f} %")
    classes = sorted(int(key[5:].split("/")[0]) for key in report if key.endswith("/digits"))
    if classes:
        lines += ["", "| class | digits | angle within (left) | angle slope within | log-scale within (left) |",
                  "|---|---|---|---|---|"]
        for label in classes:
            values = [report.get(f"class{label}/{name}") for name in CLASS_COLUMNS]
            lines.append(f"| {label} | {int(report[f'class{label}/digits'])} | "
                         + " | ".join("—" if value is None else f"{value:.2f}" for value in values) + " |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../configs", config_name="pose_split")
@report_user_errors
def main(cfg: DictConfig) -> None:
    distortion, digits = _settings(cfg)
    model = STNClassifier.from_checkpoint(cfg.ckpt_path).eval().to(cfg.device)
    upright, labels = (part[:digits] for part in read_split(resolve_root(cfg.paths.data_dir), train=False))
    seeds = [int(cfg.seed) + k for k in range(int(cfg.draws))]
    report = pose_split(model.transformer, upright, distortion, seeds, int(cfg.batch_size), labels)
    result = {"ckpt_path": str(cfg.ckpt_path), "distortion": distortion, "seeds": seeds, "split": report}
    path = Path(cfg.paths.output_dir) / "pose_split.json"
    path.write_text(json.dumps(result, indent=2))
    print(_table(report))
    print(f"Run folder: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
