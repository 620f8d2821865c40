"""MNIST under the distortions of the Spatial Transformer Networks paper, as a LightningDataModule."""

from stn.data.distortions import DISTORTIONS, distort, distort_dataset
from stn.data.mnist import MNISTDataModule
from stn.data.mnist_files import MNISTFilesError

__all__ = ["MNISTDataModule", "MNISTFilesError", "DISTORTIONS", "distort", "distort_dataset"]
