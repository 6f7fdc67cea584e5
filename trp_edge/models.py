"""Models trp-edge can compress and rebuild: CIFAR-style ResNets (He et al. 2016, sec. 4.2), torchvision's
ResNets, and by name every other classification builder in torchvision's own registry
(`torchvision.models.list_models`). Every model carries an architecture spec (a small JSON dict) from which it is
rebuilt without unpickling code."""

from __future__ import annotations

import functools
import logging
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

log = logging.getLogger(__name__)

CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
TV_RESNETS = {
    "resnet18": ([2, 2, 2, 2], False),
    "resnet34": ([3, 4, 6, 3], False),
    "resnet50": ([3, 4, 6, 3], True),
    "resnet101": ([3, 4, 23, 3], True),
    "resnet152": ([3, 8, 36, 3], True),
}
BUILTIN_NAMES = tuple(CIFAR_DEPTHS) + tuple(TV_RESNETS)
# builders whose auxiliary classifiers make the training forward return a tuple: built without them
_NO_AUX = {"googlenet", "inception_v3"}


@functools.cache
def torchvision_builders() -> tuple[str, ...]:
    """Every classification model builder in torchvision's registry (ResNets included)."""
    import torchvision
    from torchvision.models import list_models

    return tuple(list_models(module=torchvision.models))


def _build_torchvision(spec: dict[str, Any]) -> nn.Module:
    from torchvision.models import get_model

    kw: dict[str, Any] = {"aux_logits": False, "init_weights": True} if spec["builder"] in _NO_AUX else {}
    return _with_stem_channels(get_model(spec["builder"], weights=None, num_classes=spec["num_classes"], **kw),
                               spec["in_channels"])


def _with_stem_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """The model with its first conv (the stem) taking `in_channels` (a new conv of the same shape otherwise)."""
    if in_channels != 3:
        name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        model.set_submodule(name, nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride,
                                            stem.padding, stem.dilation, stem.groups, stem.bias is not None,
                                            stem.padding_mode))
    return model


# ---- CIFAR ResNet (option A shortcuts: strided identity, zero-padded channels) -----------------------

class _ShortcutA(nn.Module):
    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _ShortcutA(cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: int, num_classes: int = 10, in_channels: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            layer = []
            for b in range(blocks):
                layer.append(CifarBasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# ---- specs -------------------------------------------------------------------------------------------

def build(spec: dict[str, Any]) -> nn.Module:
    """The dense model of an architecture spec, randomly initialised."""
    family = spec.get("family")
    if family == "cifar_resnet":
        return CifarResNet(spec["blocks"], spec["num_classes"], spec["in_channels"], tuple(spec["widths"]))
    if family == "torchvision_resnet":
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        block = Bottleneck if spec["bottleneck"] else BasicBlock
        return _with_stem_channels(ResNet(block, spec["blocks"], num_classes=spec["num_classes"]), spec["in_channels"])
    if family == "torchvision":
        return _build_torchvision(spec)
    raise InputError(f"unknown architecture family {family!r} in the model spec")


def builtin_spec(name: str, in_channels: int = 3, num_classes: int | None = None) -> dict[str, Any]:
    if name in CIFAR_DEPTHS:
        return {"name": name, "family": "cifar_resnet", "blocks": CIFAR_DEPTHS[name], "widths": [16, 32, 64],
                "in_channels": in_channels, "num_classes": num_classes or 10}
    if name in TV_RESNETS:
        blocks, bottleneck = TV_RESNETS[name]
        return {"name": name, "family": "torchvision_resnet", "blocks": blocks, "bottleneck": bottleneck,
                "in_channels": in_channels, "num_classes": num_classes or 1000}
    if name in torchvision_builders():
        return {"name": name, "family": "torchvision", "builder": name, "in_channels": in_channels,
                "num_classes": num_classes or 1000}
    raise InputError(f"unknown architecture {name!r}: use one of {', '.join(BUILTIN_NAMES)}, a torchvision "
                     "classification model name (torchvision.models.list_models()) or a .pt file")


def default_input_size(spec: dict[str, Any]) -> int:
    return 32 if spec["family"] == "cifar_resnet" else 224


def infer_spec(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture a state_dict was saved from, from its keys and shapes."""
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise InputError("the state_dict matches no known architecture (no conv1.weight / fc.weight keys); "
                         "pass --arch NAME")
    in_channels = sd["conv1.weight"].shape[1]
    num_classes = sd["fc.weight"].shape[0]
    blocks = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        if idx:
            blocks.append(max(idx) + 1)
    bottleneck = any(re.match(r"layer1\.0\.conv3\.weight", k) for k in sd)
    stem_k = sd["conv1.weight"].shape[-1]
    if len(blocks) == 3 and stem_k == 3 and len(set(blocks)) == 1 and not bottleneck:
        depth = 6 * blocks[0] + 2
        widths = [int(sd[f"layer{i}.0.conv1.weight"].shape[0]) for i in (1, 2, 3)]
        return {"name": f"resnet{depth}", "family": "cifar_resnet", "blocks": blocks[0], "widths": widths,
                "in_channels": in_channels, "num_classes": num_classes}
    if len(blocks) == 4 and stem_k == 7:
        name = next((n for n, (b, bn) in TV_RESNETS.items() if b == blocks and bn == bottleneck),
                    f"resnet-{'-'.join(map(str, blocks))}")
        return {"name": name, "family": "torchvision_resnet", "blocks": blocks, "bottleneck": bottleneck,
                "in_channels": in_channels, "num_classes": num_classes}
    raise InputError(f"the state_dict matches no known architecture (stages {blocks}, stem {stem_k}x{stem_k}); "
                     "pass --arch NAME")


# ---- loading -----------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: nn.Module
    spec: dict[str, Any]
    name: str
    lowrank: dict[str, Any] | None = None  # the decomposition spec when the file is a compressed.pt


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: holds neither a state_dict nor a checkpoint dict with one "
                         "(expected a dict of tensors, or one under 'state_dict' / 'model')")
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3])[:300]
        raise InputError(f"{what}: the weights do not fit the architecture ({detail})") from e


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_model(source: str, *, arch: str | None = None, weights: str | None = None, trust_pickle: bool = False,
               in_channels: int | None = None, num_classes: int | None = None) -> LoadedModel:
    """A model from a built-in name or a .pt file (state_dict, checkpoint dict, trp-edge
    compressed.pt, or — with trust_pickle — a pickled nn.Module)."""
    path = Path(source)
    if not path.exists() and not path.suffix and (source in BUILTIN_NAMES or source in torchvision_builders()):
        spec = builtin_spec(source, in_channels or 3, num_classes)
        model = build(spec)
        if weights:
            _load_weights(model, _unwrap_state_dict(_torch_load(Path(weights), False), Path(weights)), weights)
        return LoadedModel(model, spec, source)
    if not path.exists():
        hint = (f"; built-in models: {', '.join(BUILTIN_NAMES)} and every torchvision classification model "
                "(torchvision.models.list_models())") if not path.suffix else ""
        raise InputError(f"{source}: no such file{hint}")
    if path.is_dir():
        cand = path / "compressed.pt"
        if not cand.exists():
            raise InputError(f"{source}: a directory without compressed.pt (expected a model file or an output "
                             "directory of `trp-edge compress`)")
        path = cand
    obj = _torch_load(path, trust_pickle)
    name = path.stem if path.name != "compressed.pt" else path.parent.name
    if isinstance(obj, nn.Module):
        sd = obj.state_dict()
        spec = _spec_for(sd, arch, in_channels, num_classes, path)
        model = build(spec)
        _load_weights(model, sd, str(path))
        return LoadedModel(model, spec, name)
    if isinstance(obj, dict) and obj.get("format") == "trp-edge/compressed":
        return _rebuild_compressed(obj, name, path)
    sd = _unwrap_state_dict(obj, path)
    spec = _spec_for(sd, arch, in_channels, num_classes, path)
    model = build(spec)
    _load_weights(model, sd, str(path))
    return LoadedModel(model, spec, name)


def _recorded_spec(path: Path) -> dict[str, Any] | None:
    """The architecture a `trp-edge compress` output folder records for its weights (report.json's arch), so
    its dense.pt loads as it was built, whatever the family; None outside such a folder."""
    from .report import CompressReport

    report = path.parent / "report.json"
    if path.name != "dense.pt" or not report.is_file():
        return None
    return CompressReport.read(report).arch


def _spec_for(sd, arch, in_channels, num_classes, path) -> dict[str, Any]:
    if arch:  # channels from the first conv weight, classes from the last weight (a Linear or a 1x1 conv)
        weights = [v for k, v in sd.items() if k.endswith("weight") and v.ndim >= 2]
        ic = in_channels or next((int(v.shape[1]) for v in weights if v.ndim == 4), 3)
        nc = num_classes or (int(weights[-1].shape[0]) if weights else None)
        return builtin_spec(arch, ic, nc)
    recorded = _recorded_spec(path)
    if recorded is not None:
        log.info("architecture %s as recorded in %s", recorded["name"], path.parent / "report.json")
        return recorded
    try:
        spec = infer_spec(sd)
    except InputError as e:
        raise InputError(f"{path}: {e}") from e
    log.info("inferred architecture %s from %s", spec["name"], path)
    return spec


def _torch_load(path: Path, trust_pickle: bool):
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if is_torchscript(path):
        raise InputError(f"{path}: a TorchScript archive holds compiled code, not nn.Conv2d modules, so its convs "
                         "cannot be replaced; save the state_dict instead (torch.save(model.state_dict(), ...))")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        msg = str(e)
        if "Unsupported global" not in msg:  # anything else is a damaged or foreign file
            detail = next((line.strip() for line in msg.splitlines() if "Unsupported operand" in line),
                          msg.splitlines()[0][:160] if msg else type(e).__name__)
            raise InputError(f"{path}: not a readable PyTorch file ({detail})") from e
    if not trust_pickle:
        raise InputError(f"{path}: holds pickled Python objects (a whole nn.Module?); unpickling runs code from "
                         "the file: pass --trust-pickle if you trust it, or save its state_dict instead")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot unpickle ({str(e).splitlines()[0][:160]})") from e
    if not isinstance(obj, (nn.Module, dict)):
        raise InputError(f"{path}: unpickled a {type(obj).__name__}, not an nn.Module or a state_dict")
    return obj


# ---- compressed.pt: weights plus a JSON spec, rebuilt without unpickling code ---------------------

COMPRESSED_FORMAT = "trp-edge/compressed"


def compressed_payload(model: nn.Module, arch: dict[str, Any], scheme: str, ranks: dict[str, int],
                       layer_schemes: dict[str, str] | None = None,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What compressed.pt holds: only tensors and strings, so torch.load(weights_only=True) reads it.
    `scheme` may be 'auto'; each decomposed layer records its own (`layer_schemes`, default `scheme`)."""
    import json

    per = layer_schemes or {}
    spec = {"arch": arch, "scheme": scheme,
            "layers": {n: {"scheme": per.get(n, scheme), "rank": k} for n, k in ranks.items()}}
    spec.update(extra or {})
    sd = model.state_dict()
    weights = OrderedDict((k, v.detach().cpu()) for k, v in sd.items())
    weights._metadata = getattr(sd, "_metadata", None)  # module versions (MNASNet's loader needs its own)
    return {"format": COMPRESSED_FORMAT, "version": 1, "spec": json.dumps(spec), "state_dict": weights}


def _rebuild_compressed(obj: dict[str, Any], name: str, path: Path) -> LoadedModel:
    import json

    from .lowrank import make_pair

    try:
        spec = json.loads(obj["spec"])
        model = build(spec["arch"])
        for lname, layer in spec["layers"].items():
            conv = model.get_submodule(lname)
            model.set_submodule(lname, make_pair(conv, layer["scheme"], int(layer["rank"]), init=False))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: a damaged trp-edge spec ({type(e).__name__}: {e})") from e
    _load_weights(model, obj["state_dict"], str(path))
    return LoadedModel(model, spec["arch"], name, lowrank=spec)
