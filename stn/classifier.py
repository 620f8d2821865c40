"""The downstream classifier: a small CNN that reads the (warped) image."""

from __future__ import annotations

from torch import Tensor, nn

from stn.errors import SettingError

__all__ = ["CNNClassifier", "POOLS"]

POOLS = ("gap", "flat")


def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CNNClassifier(nn.Module):
    """A conv net read out by global average pooling (``gap``) or by a flattened feature map (``flat``).

    Stages one and two hold two 3x3 conv-BN-ReLU layers each (``width`` and ``2 width`` channels)
    and end in 2x2 max pooling. Then:

    - ``pool="gap"``: a third stage (one conv layer, ``4 width`` channels), global average pooling and
      a linear layer. Independent of where the digit is: the classifier is translation-invariant, so
      it gives a spatial transformer no reason to centre the digit. About 0.14M parameters at width
      32; on its own 99.4 % test accuracy on clean MNIST in 3 epochs.
    - ``pool="flat"``: the paper's shape (conv-pool-conv-pool-fc): the stage-two map is pooled to
      ``flat_size`` x ``flat_size`` (a no-op for 28x28 inputs) and read flattened, position included,
      by a ``hidden``-unit fully connected layer. Where the digit sits matters, so a transformer learns
      to centre it.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        width: channels of the first stage.
        dropout: dropout before the final linear layer.
        pool: ``"gap"`` or ``"flat"``.
        hidden: width of the fully connected layer of ``flat``.
        flat_size: side of the feature map ``flat`` reads (any input size is pooled to it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        dropout: float = 0.1,
        pool: str = "gap",
        hidden: int = 128,
        flat_size: int = 7,
    ):
        super().__init__()
        if pool not in POOLS:
            raise SettingError(
                f"Unknown classifier pooling {pool!r}. Set model.classifier.pool to gap (global average "
                "pooling, translation-invariant) or flat (the flattened feature map, as in the paper)."
            )
        layers = [
            *_conv(in_channels, width),
            *_conv(width, width),
            nn.MaxPool2d(2),
            *_conv(width, 2 * width),
            *_conv(2 * width, 2 * width),
            nn.MaxPool2d(2),
        ]
        if pool == "gap":
            layers += [*_conv(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            head = [nn.Dropout(dropout), nn.Linear(4 * width, num_classes)]
        else:
            layers += [nn.AdaptiveAvgPool2d(flat_size), nn.Flatten()]
            head = [nn.Linear(2 * width * flat_size**2, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                    nn.Linear(hidden, num_classes)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(*head)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        return self.head(self.features(images))
