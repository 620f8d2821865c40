"""The four MNIST files: where they live, downloading them, checking them, reading them.

MNIST is read through :class:`torchvision.datasets.MNIST` from ``<root>/MNIST/raw/`` (torchvision's
layout). Before torchvision parses a file, :func:`check_files` compares its IDX header with its size,
so a missing, truncated or corrupt file is reported by name with the fix, never as a reshape error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import MNIST

from stn.errors import CorruptInputError

__all__ = ["MNIST_FILES", "MNISTFilesError", "default_root", "resolve_root", "raw_folder", "check_files", "download", "read_split"]

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

REPO_ROOT = Path(__file__).resolve().parents[2]

_IDX_UBYTE = 0x08  # IDX element type code of unsigned bytes, the only one MNIST uses


class MNISTFilesError(CorruptInputError):
    """The MNIST files are missing, truncated or corrupt and could not be (re)downloaded."""


def default_root() -> Path:
    """``$STN_DATA_DIR`` when it is set and not empty, else ``data/`` in the repository."""
    env = os.environ.get("STN_DATA_DIR", "")
    return Path(env) if env else REPO_ROOT / "data"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root for ``root``; ``None`` (or an empty string) means :func:`default_root`."""
    return default_root() if root is None or str(root) == "" else Path(root).expanduser()


def raw_folder(root: Path) -> Path:
    """The folder holding the four files: ``<root>/MNIST/raw``."""
    return root / "MNIST" / "raw"


def _fix_hint(root: Path) -> str:
    return (
        f"Put the four files {', '.join(MNIST_FILES)} into {raw_folder(root)}, or point the data root at a "
        "folder that holds MNIST/raw/ with them: set the STN_DATA_DIR environment variable, pass "
        "data.root=/path/to/data on the command line, or root=... to MNISTDataModule."
    )


def _check_file(path: Path) -> str | None:
    """What is wrong with the IDX file at ``path``, or ``None`` when its size matches its header."""
    actual = path.stat().st_size
    is_images = "images" in path.name
    ndim = 3 if is_images else 1
    header_bytes = 4 + 4 * ndim
    if actual < header_bytes:
        return f"{path.name} is truncated: {actual} bytes, shorter than its {header_bytes}-byte IDX header"
    with path.open("rb") as handle:
        header = handle.read(header_bytes)
    magic = int.from_bytes(header[:4], "big")
    if magic != (_IDX_UBYTE << 8) + ndim:
        return f"{path.name} is not an MNIST IDX file: magic number {magic:#010x}, expected {(_IDX_UBYTE << 8) + ndim:#010x}"
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if is_images and dims[1:] != [28, 28]:
        return f"{path.name} holds {dims[1]}x{dims[2]} images, expected 28x28"
    expected = header_bytes + dims[0] * (28 * 28 if is_images else 1)
    if actual != expected:
        kind = "truncated" if actual < expected else "corrupt (longer than its header says)"
        return f"{path.name} is {kind}: expected {expected} bytes for {dims[0]} records, found {actual} bytes"
    return None


def check_files(root: Path) -> None:
    """Raise :class:`MNISTFilesError` unless all four files are in ``<root>/MNIST/raw`` and whole.

    A file is whole when its size equals the size its IDX header announces, and the image and label
    files of each split hold the same number of records.
    """
    folder = raw_folder(root)
    missing = [name for name in MNIST_FILES if not (folder / name).is_file()]
    if missing:
        raise MNISTFilesError(
            f"MNIST is not in {folder}: missing {', '.join(missing)}. MNISTDataModule.prepare_data() downloads "
            f"it when the network allows. {_fix_hint(root)}"
        )
    problems = [problem for name in MNIST_FILES if (problem := _check_file(folder / name))]
    if not problems:
        for split in ("train", "t10k"):
            images = _record_count(folder / f"{split}-images-idx3-ubyte")
            labels = _record_count(folder / f"{split}-labels-idx1-ubyte")
            if images != labels:
                problems.append(f"{split} has {images} images but {labels} labels")
    if problems:
        raise MNISTFilesError(
            f"The MNIST files in {folder} are damaged: {'; '.join(problems)}. Delete the damaged files and run "
            f"again to download them afresh (prepare_data() downloads missing files), or copy intact ones. {_fix_hint(root)}"
        )


def _record_count(path: Path) -> int:
    with path.open("rb") as handle:
        return int.from_bytes(handle.read(8)[4:8], "big")


def _summary(error: BaseException) -> str:
    """``Type: first line of the message`` of ``error``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def download(root: Path) -> None:
    """Download whatever of the four files is missing into ``<root>/MNIST/raw``, then check all four.

    Raises:
        MNISTFilesError: the download failed (no network, no write access) or left damaged files.
    """
    folder = raw_folder(root)
    if all((folder / name).is_file() for name in MNIST_FILES):
        check_files(root)
        return
    try:
        for train in (True, False):
            MNIST(root, train=train, download=True)
    except (RuntimeError, OSError) as error:
        raise MNISTFilesError(
            f"MNIST is not in {folder} and downloading it failed ({_summary(error)}). Without network "
            f"access the files must be provided. {_fix_hint(root)}"
        ) from error
    check_files(root)


def read_split(root: Path, train: bool) -> tuple[Tensor, Tensor]:
    """The training (60k) or test (10k) split as stored.

    Returns:
        images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64.
    """
    check_files(root)
    dataset = MNIST(root, train=train, download=False)
    return dataset.data.unsqueeze(1).contiguous(), dataset.targets.to(torch.int64)
