"""A user's data pipelines for tests/test_data_pipelines.py: torch map-style datasets, an augmented dataset with
the user's own transform and mixup, a ResNet-20-like model (the PoL reference code's CIFAR case, scaled down) and a
loss taking probabilities (mixup's targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pol.augment import Augmented, Draws, HFlip, Mixup, RandomCrop, Transform
from pol.data import _images


class ImagesByIndex(torch.utils.data.Dataset):
    """pol's `images` served sample by sample as (x, y): y a Python int, as torchvision's datasets give labels."""

    def __init__(self, n: int, size: int, channels: int) -> None:
        d = _images(n=n, size=size, channels=channels)
        self.x, self.y = d.tensors["x"], d.tensors["y"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i].clone(), int(self.y[i])


class DictSamples(torch.utils.data.Dataset):
    """Samples as dicts of named tensors."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.arange(4, dtype=torch.float32) * (i + 1) / 64
        return {"x": x, "y": x.sum(dim=0, keepdim=True) * 0.5}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from ()


def torch_images(n: int = 128, size: int = 8, channels: int = 1) -> torch.utils.data.Dataset:
    return ImagesByIndex(n, size, channels)


def dict_samples(n: int = 64) -> torch.utils.data.Dataset:
    return DictSamples(n)


def stream() -> torch.utils.data.IterableDataset:
    return Stream()


def in_memory_rows(n: int = 4096, d: int = 64) -> dict[str, torch.Tensor]:
    """The rows `write_shards` writes, held in memory (refused under a small POL_DATA_MEMORY cap)."""
    x = ((torch.arange(n * d, dtype=torch.int64) * 7919) % 257 - 128).to(torch.float32).reshape(n, d) / 128
    return {"x": x, "y": (x[:, :4].sum(dim=1, keepdim=True) * 0.25).contiguous()}


class Speckle(Transform):
    """A user's own transform: adds uniform noise in [-1/16, 1/16) drawn from pol's keyed streams."""

    name = "speckle"

    def __call__(self, sample: dict[str, torch.Tensor], draws: Draws) -> dict[str, torch.Tensor]:
        noise = draws.uniform(tuple(sample["x"].shape), -1 / 16, 1 / 16)
        return {**sample, "x": sample["x"] + noise}


def augmented_images(n: int = 128, size: int = 8, channels: int = 3, mixup: int = 0) -> Augmented:
    """A torch dataset wrapped in the user's pipeline: crop, flip, the user's speckle and (optionally) mixup."""
    pipeline = [RandomCrop(padding=2), HFlip(), Speckle()] + ([Mixup(classes=10, alpha=mixup)] if mixup else [])
    return Augmented(ImagesByIndex(n, size, channels), pipeline)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-20's shape (3 stages of basic blocks, widths w, 2w, 4w, global average pooling), `blocks` per stage
    (ResNet-20: 3, width 16)."""

    def __init__(self, width: int = 16, blocks: int = 3, classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


def resnet(width: int = 16, blocks: int = 3, classes: int = 10, channels: int = 3) -> nn.Module:
    return ResNet(width, blocks, classes, channels)


def regressor(d: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))


def soft_cross_entropy(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy against probability targets (mixup's)."""
    return -(batch["y"] * F.log_softmax(out, dim=-1)).sum(dim=-1).mean()
