"""Classifier networks (``temporal``, ``compact``, ``paper``) and the TorchScript export wrapper.

All networks take normalised log-mel windows of shape (batch, 1, n_mels, frames) and return
logits; ``embed`` returns the penultimate features.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["CompactNet", "TemporalNet", "PaperNet", "ExportedClassifier", "build_net", "ARCHS", "count_params"]


class _DSBlock(nn.Module):
    """Depthwise-separable 3×3 conv block with batch norm; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = torch.relu(self.bn1(self.dw(x)))
        y = self.bn2(self.pw(y))
        if self.residual:
            y = y + x
        return torch.relu(y)


class _PooledNet(nn.Module):
    """Shared tail: ``embed`` (pooled features) → dropout → linear head."""

    def _head(self, dim: int, n_classes: int, dropout: float):
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, n_classes)
        self.embed_dim = dim

    def forward(self, x):
        return self.head(self.dropout(self.embed(x)))


class CompactNet(_PooledNet):
    """A CPU-sized CNN: a strided stem, 8 depthwise-separable blocks, mean+max pooling, linear head.

    Parameters
    ----------
    n_classes : int
    widths : tuple of int
        Channels of the four stages (each: one stride-2 block, one residual block).
    dropout : float
    """

    def __init__(self, n_classes: int, widths=(48, 96, 160, 256), dropout: float = 0.3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0] // 2, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(widths[0] // 2), nn.ReLU())
        blocks = []
        cin = widths[0] // 2
        for w in widths:
            blocks += [_DSBlock(cin, w, 2), _DSBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self._head(2 * cin, n_classes, dropout)

    def embed(self, x):
        h = self.blocks(self.stem(x))  # (B, C, F', T')
        h = h.mean(dim=2)  # pool frequency → (B, C, T')
        return torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)


class _TBlock(nn.Module):
    """Residual block of two 1-D convolutions (kernel 3) over time; the first may stride."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm1d(cout)
        self.c2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm1d(cout)
        self.skip = nn.Conv1d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.skip(x))


class TemporalNet(_PooledNet):
    """1-D convolutions over time with the mel bands as channels: the cheapest network per window.

    The mel window is first averaged over ``pool`` frames (so a longer window costs no more),
    then a strided stem and three strided residual blocks run along time; mean+max pooling over
    time and a linear head give the logits.

    Parameters
    ----------
    n_classes : int
    n_mels : int
    widths : tuple of int
        Channels of the stem and the three blocks.
    pool : int >= 1
        Frames averaged before the first convolution.
    dropout : float
    """

    def __init__(self, n_classes: int, n_mels: int = 128, widths=(64, 96, 128, 160), pool: int = 1,
                 dropout: float = 0.3):
        super().__init__()
        self.pool = nn.AvgPool1d(pool) if pool > 1 else nn.Identity()
        self.stem = nn.Sequential(nn.Conv1d(n_mels, widths[0], 3, 2, 1, bias=False), nn.BatchNorm1d(widths[0]),
                                  nn.ReLU())
        blocks = []
        cin = widths[0]
        for w in widths[1:]:
            blocks.append(_TBlock(cin, w, 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self._head(2 * cin, n_classes, dropout)

    def embed(self, x):
        h = self.blocks(self.stem(self.pool(x.squeeze(1))))  # (B, C, T')
        return torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)


class PaperNet(nn.Module):
    """The paper's exp-5 network: 6 × [Conv 128 5×5, ReLU, MaxPool 2, Dropout 0.3], Dense 256, Dense 128, output.

    The L2 penalty (0.003) on the 128-unit layer is applied by the trainer as weight decay on
    ``fc2`` only.
    """

    def __init__(self, n_classes: int, n_mels: int = 128, frames: int = 216, channels: int = 128):
        super().__init__()
        layers = []
        cin = 1
        f, t = n_mels, frames
        for _ in range(6):
            layers += [nn.Conv2d(cin, channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3)]
            cin = channels
            f, t = f // 2, t // 2
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(channels * f * t, 256)
        self.fc2 = nn.Linear(256, 128)
        self.out = nn.Linear(128, n_classes)
        self.embed_dim = 128

    def embed(self, x):
        h = self.features(x).flatten(1)
        return torch.relu(self.fc2(torch.relu(self.fc1(h))))

    def forward(self, x):
        return self.out(self.embed(x))


ARCHS = {"compact": CompactNet, "temporal": TemporalNet, "paper": PaperNet}


def build_net(arch: str, n_classes: int, n_mels: int, frames: int) -> nn.Module:
    if arch == "compact":
        return CompactNet(n_classes)
    if arch == "temporal":
        return TemporalNet(n_classes, n_mels, pool=max(1, frames // 216))
    if arch == "paper":
        return PaperNet(n_classes, n_mels, frames)
    raise ValueError(f"unknown arch {arch!r}")


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class ExportedClassifier(nn.Module):
    """Inference wrapper for TorchScript: mel power in, probabilities out.

    ``forward(S)`` takes mel power windows ``(batch, n_mels, frames)`` exactly as the streaming
    mel produces them, applies ``10 log10(max(S, 1e-10))``, the training set's per-band
    normalisation (stored as buffers) and the network, and returns softmax probabilities.
    """

    def __init__(self, net: nn.Module, labels: List[str], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.net = net
        self.labels: List[str] = list(labels)
        self.register_buffer("mean", mean.reshape(1, 1, -1, 1).float())
        self.register_buffer("std", std.reshape(1, 1, -1, 1).float())

    def _prep(self, S):
        x = 10.0 * torch.log10(torch.clamp(S, min=1e-10))
        return (x.unsqueeze(1) - self.mean) / self.std

    def forward(self, S):
        return torch.softmax(self.net(self._prep(S)), dim=-1)

    @torch.jit.export
    def embed(self, S):
        """Penultimate features (for distances between sets of audio)."""
        return self.net.embed(self._prep(S))

    @torch.jit.export
    def get_labels(self) -> List[str]:
        return self.labels
