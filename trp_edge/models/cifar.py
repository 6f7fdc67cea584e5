"""CIFAR-style ResNets (He et al. 2016, sec. 4.2) in the layouts the common CIFAR code bases save:

- shortcuts: option A (strided identity, zero-padded channels: no weights) or option B (a 1x1 conv + BN,
  under `shortcut.` or `downsample.`);
- blocks: basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 with expansion 4, as in the TRP authors' code);
- the classifier under `fc.` or `linear.`.

Depth and widths come from the keys, channels and classes from the shapes."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
FAMILY = "cifar_resnet"
# spec keys beyond the original five, with the values that mean "as trp-edge always built it"
LAYOUT_DEFAULTS = {"shortcut": "A", "shortcut_name": "shortcut", "head": "fc", "bottleneck": False}


class _ShortcutA(nn.Module):
    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _shortcut(kind: str, cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return _ShortcutA(cout - cin)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class CifarBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "A", shortcut_name: str = "shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, _shortcut(shortcut, cin, cout, stride))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class CifarBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, shortcut: str = "B", shortcut_name: str = "downsample"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, _shortcut(shortcut, cin, cout, stride))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: int, num_classes: int = 10, in_channels: int = 3, widths=(16, 32, 64),
                 shortcut: str = "A", shortcut_name: str = "shortcut", head: str = "fc", bottleneck: bool = False):
        super().__init__()
        block = CifarBottleneck if bottleneck else CifarBasicBlock
        expansion = 4 if bottleneck else 1
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            layer = []
            for b in range(blocks):
                layer.append(block(cin, w, 2 if (b == 0 and i > 0) else 1, shortcut, shortcut_name))
                cin = w * expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.head = head
        setattr(self, head, nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return getattr(self, self.head)(x)


def spec(name: str, in_channels: int, num_classes: int | None) -> dict[str, Any]:
    return {"name": name, "family": FAMILY, "blocks": CIFAR_DEPTHS[name], "widths": [16, 32, 64],
            "in_channels": in_channels, "num_classes": num_classes or 10}


def build(s: dict[str, Any]) -> nn.Module:
    layout = {k: s.get(k, v) for k, v in LAYOUT_DEFAULTS.items()}
    return CifarResNet(s["blocks"], s["num_classes"], s["in_channels"], tuple(s["widths"]), **layout)


def infer(sd: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The CIFAR ResNet a state_dict holds (three stages of equal depth behind a 3x3 stem), or None."""
    head = next((h for h in ("fc", "linear") if f"{h}.weight" in sd), None)
    stem = sd.get("conv1.weight")
    if head is None or stem is None or stem.ndim != 4 or stem.shape[-1] != 3:
        return None
    blocks = [len({m.group(1) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in (1, 2, 3, 4)]
    if blocks[3] or not blocks[0] or len(set(blocks[:3])) != 1:
        return None
    bottleneck = "layer1.0.conv3.weight" in sd
    names = {m.group(1) for k in sd if (m := re.match(r"layer\d\.\d+\.(shortcut|downsample)\.0\.weight", k))}
    widths = [int(sd[f"layer{i}.0.conv1.weight"].shape[0]) for i in (1, 2, 3)]
    n = blocks[0]
    depth = 6 * n + 2  # as the CIFAR code bases name them, bottleneck ones included (the TRP authors' resnet56)
    found = {"shortcut": "B" if names else "A", "shortcut_name": next(iter(names), "shortcut"), "head": head,
             "bottleneck": bottleneck}
    s = {"name": f"resnet{depth}", "family": FAMILY, "blocks": n, "widths": widths,
         "in_channels": int(stem.shape[1]), "num_classes": int(sd[f"{head}.weight"].shape[0])}
    s.update({k: v for k, v in found.items() if v != LAYOUT_DEFAULTS[k]})
    return s
