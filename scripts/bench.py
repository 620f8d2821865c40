"""Benchmarks that print tables of timings and ratios against named peers.

    python scripts/bench.py tps     # TPS warp: stn vs kornia vs a per-call-solve generator vs bare grid_sample
    python scripts/bench.py data    # distorted-MNIST training images/s per distortion (dataloader + distortion)
    python scripts/bench.py train mnist_tps mnist_affine mnist_cnn   # a training step, phase by phase
    python scripts/bench.py loc_net shufflenet_v2_x0_5:stage2:32 resnet18:layer2:42 --backbone-dtype bfloat16  # loc-net cuts
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from stn.data import DISTORTIONS, MNISTDataModule
from stn.localization import LocalizationNet, random_backbones_replaced
from stn.precision import BACKBONE_DTYPES
from stn.step_profile import PHASES, StepProfile, profile_training_steps
from stn.tps import TPSGridGen, grid_points

REPO = Path(__file__).resolve().parents[1]

TPS_SHAPES = [(64, 1, 28, 28, 16), (64, 1, 42, 42, 16), (32, 3, 224, 224, 25), (128, 3, 32, 100, 20)]


def median_seconds(fn, min_run_time: float) -> float:
    """Median wall time of one call of ``fn``, on the process's threads (``Timer`` alone would use one)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def layout_for(count: int) -> tuple[int, int]:
    """The most square ``rows x cols`` grid with ``count`` points."""
    rows = max(r for r in range(2, int(math.isqrt(count)) + 1) if count % r == 0)
    return rows, count // rows


def textbook_grid(source: torch.Tensor, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The usual TPS grid generator: build and solve the system, evaluate U at every pixel, per call.

    ``source`` ``(N, T, 2)``, ``target`` ``(T, 2)`` -> grid ``(N, H, W, 2)``.
    """
    batch, count = source.shape[:2]
    distances = torch.cdist(target, target).square()
    kernel = distances * torch.log(distances + 1e-12)
    affine = torch.cat([torch.ones(count, 1), target], dim=1)
    system = torch.cat([torch.cat([kernel, affine], 1), torch.cat([affine.T, torch.zeros(3, 3)], 1)], 0)
    rhs = torch.cat([source, source.new_zeros(batch, 3, 2)], dim=1)
    coefficients = torch.linalg.solve(system.expand(batch, -1, -1), rhs)
    base = F.affine_grid(torch.eye(2, 3).expand(batch, -1, -1), [batch, 1, *size], align_corners=False)
    pixels = base.reshape(batch, -1, 2)
    pixel_distances = torch.cdist(pixels, target.expand(batch, -1, -1)).square()
    pixel_kernel = pixel_distances * torch.log(pixel_distances + 1e-12)
    basis = torch.cat([pixel_kernel, torch.ones_like(pixels[..., :1]), pixels], dim=-1)
    return (basis @ coefficients).view(batch, *size, 2)


def tps_contenders(shape: tuple[int, ...], backward: bool) -> dict[str, object]:
    """Callables warping one batch of ``shape`` (N, C, H, W, T), each way we compare."""
    from kornia.geometry.transform import get_tps_transform, warp_image_tps

    batch, channels, height, width, count = shape
    target = grid_points(*layout_for(count))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, channels, height, width, generator=generator)
    source = (target + 0.05 * torch.randn(batch, count, 2, generator=generator)).requires_grad_(backward)
    stn_generator = TPSGridGen(target, size=(height, width))
    fixed_grid = stn_generator(source.detach()).requires_grad_(backward)
    targets = target.expand(batch, -1, -1)

    def run(warp):
        def call():
            out = warp()
            if backward:
                out.sum().backward()

        return call

    def kornia_warp():
        kernel_weights, affine_weights = get_tps_transform(targets, source)
        return warp_image_tps(image, source, kernel_weights, affine_weights)

    return {
        "stn": run(lambda: F.grid_sample(image, stn_generator(source), align_corners=False)),
        "kornia": run(kornia_warp),
        "per-call solve": run(lambda: F.grid_sample(image, textbook_grid(source, target, (height, width)), align_corners=False)),
        "grid_sample floor": run(lambda: F.grid_sample(image, fixed_grid, align_corners=False)),
    }


def tps_accuracy(shape: tuple[int, ...]) -> dict[str, float]:
    """Largest distance, in output pixels, of each float32 grid from the float64 TPS grid."""
    from kornia.geometry.transform import get_tps_transform, warp_points_tps

    batch, _, height, width, count = shape
    target = grid_points(*layout_for(count))
    source = target + 0.05 * torch.randn(batch, count, 2, generator=torch.Generator().manual_seed(0))
    exact = TPSGridGen(target.double(), size=(height, width))(source.double())
    pixels = F.affine_grid(torch.eye(2, 3).expand(batch, -1, -1), [batch, 1, height, width], align_corners=False)
    kernel_weights, affine_weights = get_tps_transform(target.expand(batch, -1, -1), source)
    grids = {
        "stn": TPSGridGen(target, size=(height, width))(source),
        "kornia": warp_points_tps(pixels.reshape(batch, -1, 2), source, kernel_weights, affine_weights),
        "per-call solve": textbook_grid(source, target, (height, width)),
    }
    half_size = torch.tensor([width / 2, height / 2], dtype=torch.float64)
    return {name: float(((grid.double().view_as(exact) - exact) * half_size).abs().max()) for name, grid in grids.items()}


def bench_tps(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per call, ratio = peer / stn\n")
    for backward in (False, True):
        print(f"### {'forward + backward' if backward else 'forward'}\n")
        print("| N,C,H,W,T | stn ms | kornia ms | per-call solve ms | grid_sample floor ms | kornia / stn | per-call / stn | stn / floor |")
        print("|---|---|---|---|---|---|---|---|")
        for shape in TPS_SHAPES:
            times = {name: median_seconds(fn, args.min_run_time) * 1e3 for name, fn in tps_contenders(shape, backward).items()}
            stn = times["stn"]
            print(
                f"| {','.join(map(str, shape))} | {stn:.3f} | {times['kornia']:.2f} | {times['per-call solve']:.2f} | "
                f"{times['grid_sample floor']:.3f} | {times['kornia'] / stn:.1f}x | {times['per-call solve'] / stn:.1f}x | "
                f"{stn / times['grid_sample floor']:.2f}x |"
            )
        print()
    print("### exactness: largest |grid - float64 TPS grid| in output pixels\n")
    print("| N,C,H,W,T | stn | kornia | per-call solve |")
    print("|---|---|---|---|")
    for shape in TPS_SHAPES:
        error = tps_accuracy(shape)
        print(f"| {','.join(map(str, shape))} | {error['stn']:.1e} | {error['kornia']:.1e} | {error['per-call solve']:.1e} |")


def bench_data(args: argparse.Namespace) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; batch {args.batch_size}, num_workers=0; "
        f"median of {args.repeats} runs of {args.batches} batches; goal >= 20,000 images/s\n"
    )
    print("| distortion | image size | training images/s | ms per batch |")
    print("|---|---|---|---|")
    for name in DISTORTIONS:
        datamodule = MNISTDataModule(root=args.root, distortion=name, batch_size=args.batch_size)
        datamodule.prepare_data()
        datamodule.setup("fit")
        generator = datamodule.training_generator(epoch=0)

        def images_per_second(batches: int) -> float:
            """``train_dataloader()`` plus the distortion that ``on_after_batch_transfer`` applies."""
            start, count = time.perf_counter(), 0
            for index, (images, _) in enumerate(datamodule.train_dataloader()):
                if index == batches:
                    break
                count += datamodule.distort(images, generator).shape[0]
            return count / (time.perf_counter() - start)

        images_per_second(5)
        rate = statistics.median(images_per_second(args.batches) for _ in range(args.repeats))
        height, width = datamodule.image_size
        print(f"| {name} | {height}x{width} | {rate:,.0f} | {1e3 * args.batch_size / rate:.2f} |")


def loc_net_spec(spec: str) -> tuple[str, str | None, int | None]:
    """``backbone[:node[:view size]]`` -> ``(backbone, feature_node, input_size)``; node ``pooled``: ``None``."""
    backbone, node, size = (spec.split(":") + [None, None])[:3]
    return backbone, None if node in (None, "", "pooled") else node, None if size in (None, "") else int(size)


def bench_loc_net(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.batch_size} images of "
          f"{args.canvas}x{args.canvas}, random weights, {'channels-last' if args.channels_last else 'contiguous'}, "
          f"backbone in {args.backbone_dtype}; median ms; ratio = this cut / the first (learning, input with grad)\n")
    print("| loc-net (backbone:node:view) | parameters | head inputs | frozen backbone, forward only ms | "
          "forward + backward, input without grad (first stage) ms | input with grad (later stages) ms | / first |")
    print("|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 1, args.canvas, args.canvas, generator=generator)
    images = images * (torch.rand(images.shape, generator=generator) > 0.8)  # mostly empty, as a digit canvas
    first = None
    for spec in args.specs:
        backbone, node, size = loc_net_spec(spec)
        times = []
        for frozen in (True, False):
            torch.manual_seed(0)
            with random_backbones_replaced():  # stand-ins for trained weights: same cost
                net = LocalizationNet(torch.zeros(4), backbone=backbone, weights=None, feature_node=node, input_size=size,
                                      freeze_backbone=frozen, backbone_dtype=args.backbone_dtype)
            if args.channels_last:
                net.to(memory_format=torch.channels_last)
                net.memory_format = torch.channels_last
            for grad in (False,) if frozen else (False, True):
                inputs = images.clone().requires_grad_(grad)

                def step():
                    if frozen:  # a frozen first stage in training: its head learns, the backbone only reads
                        with torch.no_grad():
                            features = net.features(inputs)
                        net.head(features).sum().backward()
                    else:
                        net(inputs).sum().backward()

                for _ in range(args.warmup):
                    step()
                times.append(1e3 * median_seconds(step, args.min_run_time))
        first = first or times[2]
        parameters = sum(p.numel() for p in net.parameters())
        head_inputs = net.head[0].in_features if isinstance(net.head, torch.nn.Sequential) else net.head.in_features
        print(f"| {spec} | {parameters:,} | {head_inputs:,} | {times[0]:.1f} | {times[1]:.1f} | {times[2]:.1f} | "
              f"{times[2] / first:.2f}x |")


AUTOCAST = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
"""Lightning's mixed ``trainer.precision`` values and the autocast dtype each runs the forward pass in."""


def experiment_parts(name: str, overrides: list[str]) -> tuple[MNISTDataModule, object, torch.dtype | None]:
    """The data module (set up for fit) and model that ``train.py +experiment=<name>`` would build."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}", "model.loc_net.weights=null", *overrides])
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    with random_backbones_replaced():  # random weights stand in for pretrained ones: a step costs the same
        model = instantiate(cfg.model)
    model.setup("fit")  # model.compile applies here, as in a Trainer
    return datamodule, model, AUTOCAST.get(str(cfg.trainer.precision))


def bench_train(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{machine['device']}, {machine['threads']} threads, torch {machine['torch']}; median of {args.steps} steps "
          f"after {args.warmup} warm-up steps, the experiments taking turns in {args.rounds} rounds; ms per training "
          "step of one batch, phase by phase\n")
    print(f"| experiment | {' | '.join(PHASES)} | step ms | train images/s | eval images/s | peak memory MB |")
    print("|---|" + "---|" * (len(PHASES) + 4))
    profiles = []
    for name in args.experiments:
        datamodule, model, autocast = experiment_parts(name, args.overrides)
        profiles.append(StepProfile(model.to(device), datamodule, device, autocast))
    results = dict(zip(args.experiments, profile_training_steps(profiles, args.steps, args.warmup, args.rounds)))
    for (name, result), profile in zip(results.items(), profiles):
        result["autocast"] = str(profile.autocast).removeprefix("torch.") if profile.autocast else None
        phases = " | ".join(f"{result['phases_ms'][phase]:.1f} ({100 * result['phases_ms'][phase] / result['step_ms']:.0f} %)" for phase in PHASES)
        print(f"| {name} | {phases} | {result['step_ms']:.1f} | {result['train_images_per_s']:,.0f} | "
              f"{result['eval_images_per_s']:,.0f} | {result['peak_memory_mb']:,.0f} |")
    if len(results) > 1 and "mnist_cnn" in results:
        base = results["mnist_cnn"]["train_images_per_s"]
        print("\ntraining throughput / mnist_cnn's: " + ", ".join(
            f"{name} {result['train_images_per_s'] / base:.2f}x" for name, result in results.items()))
    folder = Path(args.output) if args.output else REPO / "outputs" / "bench" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps({"machine": machine, "steps": args.steps, "warmup": args.warmup,
                                                    "rounds": args.rounds, "overrides": args.overrides,
                                                    "results": results}, indent=2))
    print(f"\nRun folder: {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tps = commands.add_parser("tps", help="TPS warp speed against kornia, a per-call-solve generator and grid_sample")
    tps.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per cell")
    tps.set_defaults(run=bench_tps)
    data = commands.add_parser("data", help="distorted-MNIST training images/s per distortion: dataloader + distortion, num_workers=0")
    data.add_argument("--root", default=None, help="MNIST data root (default: $STN_DATA_DIR, else data/ in the repo)")
    data.add_argument("--batch-size", type=int, default=128)
    data.add_argument("--batches", type=int, default=100, help="batches per timed run")
    data.add_argument("--repeats", type=int, default=3, help="timed runs per distortion (the median is shown)")
    data.set_defaults(run=bench_data)
    train = commands.add_parser("train", help="a training step phase by phase, training and evaluation images/s, peak memory")
    train.add_argument("experiments", nargs="*", default=["mnist_tps", "mnist_affine", "mnist_cnn"], help="experiment names")
    train.add_argument("--steps", type=int, default=30, help="timed steps (the median is shown)")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    train.add_argument("--rounds", type=int, default=5,
                       help="the experiments take turns, steps/rounds timed steps each per turn (1: one after another)")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--override", dest="overrides", action="append", default=[],
                       help="a Hydra override for every experiment, e.g. --override data.batch_size=256 (repeatable)")
    train.add_argument("--output", default=None, help="folder for train.json (default: outputs/bench/<date>_<time>)")
    train.set_defaults(run=bench_train)
    loc_net = commands.add_parser("loc_net", help="time of loc-net cuts (backbone:node:view size), frozen and learning")
    loc_net.add_argument("specs", nargs="*", default=["shufflenet_v2_x0_5:stage2:32", "shufflenet_v2_x0_5:stage2:24",
                                                      "mobilenet_v3_small:features.2:32", "resnet18:layer2:42"],
                         help="backbone[:node[:view size]], node 'pooled' for the pooled features")
    loc_net.add_argument("--batch-size", type=int, default=128)
    loc_net.add_argument("--canvas", type=int, default=42, help="side of the input image (RTS: 42)")
    loc_net.add_argument("--warmup", type=int, default=15, help="untimed calls first (CPU kernels settle slowly)")
    loc_net.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per cell")
    loc_net.add_argument("--channels-last", action="store_true")
    loc_net.add_argument("--backbone-dtype", default="float32", choices=BACKBONE_DTYPES,
                         help="as model.loc_net.backbone_dtype: bfloat16 runs the backbone under autocast")
    loc_net.set_defaults(run=bench_loc_net)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
