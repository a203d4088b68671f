"""A compact 3D U-Net family for both stages (lobes, opacity).

Four resolution levels by default; every block is Conv3d + BatchNorm3d + ReLU, so BatchNorm folds
into the convolution for inference (the ONNX export does it), and the graph uses only Conv,
ConvTranspose, MaxPool, Concat and Relu: operators every backend (ONNX Runtime CPU/CUDA, TensorRT)
runs well at fp32 and fp16. Output is logits (N, C, D, H, W); the runtime does the softmax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the network (stored in checkpoints and in the manifest)."""

    n_classes: int
    base: int = 8
    levels: int = 4
    in_channels: int = 1
    max_channels: int = 256
    """Channel count cap for the deep levels (keeps the file small at large `base`)."""
    top_convs: int = 2
    """Convolutions per block at full resolution (1 halves the cost of the costliest level)."""
    coords: int = 0
    """1: append three position channels (-1..1 along each tile axis) to the input and to the
    last decoder block. Lobe identity depends on where a voxel sits in the chest; with one tile
    centred on the chest these channels give the network that position directly."""

    def __post_init__(self) -> None:
        if not isinstance(self.n_classes, int) or self.n_classes < 2:
            raise ValueError(f"`n_classes` must be an int >= 2, got {self.n_classes!r}")
        if not isinstance(self.base, int) or self.base < 1:
            raise ValueError(f"`base` must be a positive int, got {self.base!r}")
        if not isinstance(self.levels, int) or not 2 <= self.levels <= 6:
            raise ValueError(f"`levels` must be an int in 2..6, got {self.levels!r}")
        if self.top_convs not in (1, 2):
            raise ValueError(f"`top_convs` must be 1 or 2, got {self.top_convs!r}")
        if self.coords not in (0, 1):
            raise ValueError(f"`coords` must be 0 or 1, got {self.coords!r}")

    def channels(self) -> list[int]:
        return [min(self.base * 2**i, self.max_channels) for i in range(self.levels)]

    @property
    def divisor(self) -> int:
        """Every spatial tile dimension must be a multiple of this."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, int | str]:
        return {"type": "unet3d", **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict) -> UNetConfig:
        names = ("n_classes", "base", "levels", "in_channels", "max_channels", "top_convs", "coords")
        fields = {k: raw[k] for k in names if k in raw}
        return cls(**fields)


class ConvBlock(nn.Sequential):
    """`n` x (Conv3d 3x3x3 + BatchNorm3d + ReLU); the convolution has no bias (BN supplies it)."""

    def __init__(self, c_in: int, c_out: int, n: int = 2) -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm3d(c_out),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """Encoder (ConvBlock, MaxPool) x levels, decoder (ConvTranspose 2x, concat skip, ConvBlock)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels()
        n_pos = 3 if config.coords else 0
        self.down = nn.ModuleList()
        c_prev = config.in_channels + n_pos
        for i, c in enumerate(ch):
            self.down.append(ConvBlock(c_prev, c, config.top_convs if i == 0 else 2))
            c_prev = c
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i, c_skip in reversed(list(enumerate(ch[:-1]))):
            self.up.append(nn.ConvTranspose3d(c_prev, c_skip, 2, stride=2))
            extra = n_pos if i == 0 else 0
            self.dec.append(ConvBlock(2 * c_skip + extra, c_skip, config.top_convs if i == 0 else 2))
            c_prev = c_skip
        self.head = nn.Conv3d(ch[0], config.n_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The head keeps PyTorch's default init: a tiny head (std 0.01) behind BatchNorm made
        # Adam need hundreds of steps just to grow the logits before any class could win.
        self.head.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = position_channels(x) if self.config.coords else None
        if pos is not None:
            x = torch.cat([x, pos], dim=1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for k, (up, dec, skip) in enumerate(zip(self.up, self.dec, reversed(skips), strict=True)):
            parts = [up(x), skip]
            if pos is not None and k == len(self.dec) - 1:
                parts.append(pos)
            x = dec(torch.cat(parts, dim=1))
        return self.head(x)


def position_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, D, H, W): each voxel's position along the tile's three axes, -1 at the first voxel
    and +1 at the last. Built from cumulative sums so the ONNX graph needs no shape arithmetic."""
    ones = torch.ones_like(x[:, :1])
    out = []
    for dim in (2, 3, 4):
        idx = torch.cumsum(ones, dim=dim)
        out.append(2.0 * (idx - 1.0) / (idx.amax(dim=(2, 3, 4), keepdim=True) - 1.0).clamp_min(1.0) - 1.0)
    return torch.cat(out, dim=1)


def build(config: UNetConfig) -> UNet3D:
    return UNet3D(config)


def check_tile_shape(tile_shape: tuple[int, int, int], config: UNetConfig) -> None:
    """Refuse tile shapes the pooling cannot halve down to the bottom level."""
    if len(tile_shape) != 3 or any(int(s) % config.divisor or s <= 0 for s in tile_shape):
        raise ValueError(
            f"`tile_shape` must be three positive multiples of {config.divisor}, got {tile_shape}"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
