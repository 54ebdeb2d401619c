"""The 8x8 digits data set every bundled model and the quality judge share: one fixed train/held-out split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The one split every digits figure uses: stratified 80/20, seed 0 (training never sees the test part).
SPLIT_SEED = 0
TEST_FRACTION = 0.2
PIXEL_MAX = 16                       # sklearn digits hold integers 0..16
CLASS_NAMES = tuple(str(d) for d in range(10))
IMAGE_SIZE = 8


@dataclass(frozen=True)
class DigitsSplit:
    """Train and held-out test digits as (N, 1, 8, 8) float32 in [-1, 1] with their labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def to_unit_range(values: np.ndarray) -> np.ndarray:
    """Digit intensities 0..16 -> [-1, 1], the same map as IdentityCodec (v * 255/16 / 127.5 - 1 = v/8 - 1)."""
    return values.astype(np.float32) * (2.0 / PIXEL_MAX) - 1.0


def to_uint8_images(values: np.ndarray) -> np.ndarray:
    """Digit intensities 0..16, shape (N, 64) -> uint8 images (N, 8, 8, 1) on the 0..255 scale."""
    pixels = np.rint(values.astype(np.float64) * (255.0 / PIXEL_MAX)).astype(np.uint8)
    return pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)


def load_digits_split() -> DigitsSplit:
    """scikit-learn's 1797 digits, split stratified 80/20 with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=TEST_FRACTION, stratify=data.target, random_state=SPLIT_SEED)

    def as_tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(to_unit_range(values)).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)

    return DigitsSplit(as_tensor(x_train), torch.from_numpy(y_train).long(),
                       as_tensor(x_test), torch.from_numpy(y_test).long())
