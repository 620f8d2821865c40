"""The downstream classifier: a small CNN that reads the (warped) image."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CNNClassifier"]


def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CNNClassifier(nn.Module):
    """Three conv stages (``width``, ``2 width``, ``4 width`` channels) + global average pooling.

    Stages one and two hold two 3x3 conv-BN-ReLU layers each and end in 2x2 max pooling; stage
    three is one conv layer. Global average pooling makes the network independent of the input
    size (28x28 MNIST, 42x42 canvases, anything in between). About 0.14M parameters at width 32;
    on its own it reaches 99.4 % test accuracy on clean MNIST in 3 epochs
    (``scripts/train.py +experiment=mnist_cnn data.distortion=none trainer.max_epochs=3``).

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        width: channels of the first stage.
        dropout: dropout before the final linear layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, width),
            *_conv(width, width),
            nn.MaxPool2d(2),
            *_conv(width, 2 * width),
            *_conv(2 * width, 2 * width),
            nn.MaxPool2d(2),
            *_conv(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        return self.head(self.features(images))
