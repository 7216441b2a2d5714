"""The paper's custom CNN (Shah, Nadar, Kanikar 2025): a PyTorch port of their Keras model.

Keras original::

    Rescaling(1/255) -> Conv2D(16, 3, padding="same", relu) -> MaxPool2D
    -> Conv2D(32, 3, padding="same", relu) -> MaxPool2D
    -> Conv2D(64, 3, padding="same", relu) -> MaxPool2D
    -> Dropout(0.5) -> Flatten -> Dense(128, relu) -> Dense(n_classes)

The 1/255 rescale is done by :class:`~marrowscope.models.registry.Classifier` (input in [0, 1],
mean 0, std 1), so this module takes float NCHW in [0, 1] and returns logits (softmax is applied
outside). Weights are initialised like Keras (Glorot-uniform kernels, zero biases). There are no
pretrained weights: the paper trains it from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

PAPER_CNN_CHANNELS = (16, 32, 64)
PAPER_CNN_HIDDEN = 128
PAPER_CNN_DROPOUT = 0.5


def flatten_size(input_size: int) -> int:
    """Length of the flattened feature vector for a square ``input_size`` (224 -> 28*28*64)."""
    side = input_size
    for _ in PAPER_CNN_CHANNELS:
        side //= 2  # MaxPool2D(2), 'valid' padding: floor
    return side * side * PAPER_CNN_CHANNELS[-1]


class PaperCNN(nn.Module):
    """The paper's three-block CNN with a Dense(128) head.

    Submodules ``conv1``..``conv3`` are ``Conv2d -> ReLU`` blocks (a Keras ``Conv2D`` with
    ``activation="relu"``), so ``conv3``'s output is the last convolutional feature map.

    Args:
        num_classes: number of output logits.
        input_size: side of the square input; fixes the flatten size.
    """

    def __init__(self, num_classes: int, input_size: int = 224) -> None:
        super().__init__()
        if input_size < 8:
            raise ValueError(
                f"paper_cnn needs an input of at least 8x8 pixels (three 2x2 poolings); got "
                f"{input_size}; raise preprocess.size"
            )
        self.input_size = int(input_size)
        c1, c2, c3 = PAPER_CNN_CHANNELS
        self.conv1 = _conv_relu(3, c1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = _conv_relu(c1, c2)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = _conv_relu(c2, c3)
        self.pool3 = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(PAPER_CNN_DROPOUT)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(flatten_size(input_size), PAPER_CNN_HIDDEN)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(PAPER_CNN_HIDDEN, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults: Glorot-uniform kernels, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a float NCHW batch already rescaled to [0, 1]."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"paper_cnn was built for {self.input_size}x{self.input_size} inputs but got "
                f"{tuple(x.shape[-2:])}; resize the images to {self.input_size} px (its Dense "
                "layer size depends on the input size)"
            )
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        x = self.flatten(self.dropout(x))
        return self.fc2(self.relu(self.fc1(x)))


def _conv_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())
