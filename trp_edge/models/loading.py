"""load_model: a model from any source trp-edge takes, and the compressed files it writes.

Sources: a model name (every family of the registry), a state_dict or checkpoint dict (architecture inferred
from keys and shapes), a trp-edge output (compressed.pt: weights plus a JSON spec, rebuilt without unpickling;
or compressed.pt2), a torch.export program (.pt2, loaded without running code from the file), an nn.Module
object (the Python API), and with trust_pickle a pickled nn.Module of any class (used as itself)."""

from __future__ import annotations

import json
import logging
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contracts import COMPRESSED_MODEL
from ..errors import InputError
from . import exported
from .registry import BUILTIN_NAMES, build, builtin_spec, infer_spec, is_known
from .zoo import io_channels

log = logging.getLogger(__name__)

COMPRESSED_FORMAT = COMPRESSED_MODEL.format
# classes whose pickled modules are rebuilt from their state_dict (so outputs keep a JSON spec)
_KNOWN_MODULES = ("torchvision.models.", "trp_edge.models.")


@dataclass
class LoadedModel:
    model: nn.Module
    spec: dict[str, Any]
    name: str
    lowrank: dict[str, Any] | None = None  # the decomposition spec when the file is a compressed.pt


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights", "params"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: holds neither a state_dict nor a checkpoint dict with one "
                         "(expected a dict of tensors, or one under 'state_dict' / 'model')")
    for prefix in ("module.", "model.", "_orig_mod."):  # DataParallel / DDP, wrappers, torch.compile
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


def module_spec(model: nn.Module, name: str, example: torch.Tensor) -> dict[str, Any]:
    """The spec of a model trp-edge has no builder for (family `export`: it is rebuilt from its .pt2): its
    input from `example`, its classes from one forward pass."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        raise InputError(f"{name}: the model does not run on a {tuple(example.shape)} input "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); pass "
                         "--input-size / --in-channels or data of the size it takes") from e
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise InputError(f"{name}: a classifier must return one (batch, classes) tensor, got "
                         f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
    return {"name": name, "family": exported.FAMILY, "in_channels": int(example.shape[1]),
            "num_classes": int(out.shape[1]), "input_size": int(example.shape[-1])}


def load_model(source: str | nn.Module, *, arch: str | None = None, weights: str | None = None,
               trust_pickle: bool = False, in_channels: int | None = None, num_classes: int | None = None,
               input_size: int | None = None) -> LoadedModel:
    """A model from a name, a file, an output folder of `trp-edge compress` or an nn.Module (see the module
    docstring). `input_size` is what a model without a recorded input (a user module) is run at."""
    if isinstance(source, nn.Module):
        return _from_module(source, type(source).__name__.lower(), in_channels, input_size)
    path = Path(source)
    if not path.exists() and not path.suffix and (shipped := pretrained(source)) is not None:
        path = shipped  # a trained model that ships with trp-edge, by its name
    if not path.exists() and not path.suffix and is_known(source):
        spec = builtin_spec(source, in_channels or 3, num_classes)
        model = build(spec)
        if weights:
            _load_weights(model, _unwrap_state_dict(_torch_load(Path(weights), False), Path(weights)), weights)
        return LoadedModel(model, spec, source)
    if not path.exists():
        hint = (f"; built-in models: {', '.join(BUILTIN_NAMES)} and every torchvision classification model "
                "(torchvision.models.list_models()); trained: "
                f"{', '.join(sorted(p.stem for p in PRETRAINED.glob('*.pt')))}") if not path.suffix else ""
        raise InputError(f"{source}: no such file{hint}")
    if path.is_dir():
        found = model_file(path, "compressed")
        if found is None:
            raise InputError(f"{source}: a directory without compressed.pt (expected a model file or an output "
                             "directory of `trp-edge compress`)")
        path = found
    name = path.stem if path.stem != "compressed" else path.parent.name
    if path.suffix == ".pt2":
        return _from_program(path, name, in_channels)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module) and not type(obj).__module__.startswith(_KNOWN_MODULES):
        return _from_module(obj, name, in_channels, input_size)
    if isinstance(obj, dict) and obj.get("format") == COMPRESSED_FORMAT:
        COMPRESSED_MODEL.check(obj, str(path))  # a newer trp-edge's file is refused, not misread
        return _rebuild_compressed(obj, name, path)
    sd = obj.state_dict() if isinstance(obj, nn.Module) else _unwrap_state_dict(obj, path)
    spec = _spec_for(sd, arch, in_channels, num_classes, path)
    model = build(spec)
    _load_weights(model, sd, str(path))
    return LoadedModel(model, spec, name)


PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"  # each NAME.pt beside NAME.json (how it was made)


def pretrained(name: str) -> Path | None:
    """The file of a trained model shipped with trp-edge (`resnet20-fashion-mnist`: the demo's), None if none."""
    path = PRETRAINED / f"{name}.pt"
    return path if "/" not in name and path.is_file() else None


def _first_conv_channels(model: nn.Module) -> int | None:
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _from_module(model: nn.Module, name: str, in_channels: int | None, input_size: int | None) -> LoadedModel:
    ic = in_channels or _first_conv_channels(model) or 3
    size = input_size or 224
    return LoadedModel(model, module_spec(model, name, torch.zeros(2, ic, size, size)), name)


def _from_program(path: Path, name: str, in_channels: int | None) -> LoadedModel:
    """A .pt2: a trp-edge output (its spec inside; a compressed one with its pairs regrouped) or a user's
    program, whose input shape is the one it was exported at."""
    model, saved, shape, fixed = exported.load(path)
    if saved is not None:
        if "layers" in saved:  # compressed.pt2 (dense.pt2 records its arch only), as compressed.pt is read
            exported.regroup_(model, saved["layers"])
            return LoadedModel(model, saved["arch"], name, lowrank=saved)
        return LoadedModel(model, saved["arch"], name)
    if len(shape) != 4:
        raise InputError(f"{path}: the program takes a {len(shape)}-d input; trp-edge takes images (N, C, H, W)")
    if fixed not in (None, 1):
        raise InputError(f"{path}: exported with a fixed batch of {fixed}; trp-edge runs a model at batch 1 "
                         "(latency) and in batches (training, accuracy): export it with batch 1, or with "
                         "dynamic_shapes=({0: torch.export.Dim('batch')},)")
    spec = module_spec(model, name, torch.zeros(fixed or 2, in_channels or shape[1], shape[2], shape[3]))
    if fixed is not None:
        spec["fixed_batch"] = fixed  # exported without a free batch dimension: it runs at this batch only
    return LoadedModel(model, spec, name)


def model_file(folder: Path, stem: str) -> Path | None:
    """A compress output's `stem`.pt, or its `stem`.pt2 program (for models outside the known families)."""
    return next((folder / f"{stem}{ext}" for ext in (".pt", ".pt2") if (folder / f"{stem}{ext}").is_file()), None)


def _recorded_spec(path: Path) -> dict[str, Any] | None:
    """The architecture a `trp-edge compress` output folder records for its weights (report.json's arch), so
    its dense.pt loads as it was built, whatever the family; None outside such a folder."""
    from ..contracts import CompressReport

    report = path.parent / "report.json"
    if path.name != "dense.pt" or not report.is_file():
        return None
    return CompressReport.read(report).arch


def _spec_for(sd, arch, in_channels, num_classes, path) -> dict[str, Any]:
    if arch:  # channels from the first conv weight, classes from the last weight (a Linear or a 1x1 conv)
        ic, nc = io_channels(sd)
        return builtin_spec(arch, in_channels or ic, num_classes or nc)
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
        hint = ("; the pickled class must be importable here (its module on PYTHONPATH): one defined in a script's "
                "__main__ cannot be found by another process") if isinstance(e, AttributeError | ImportError) else ""
        raise InputError(f"{path}: cannot unpickle ({str(e).splitlines()[0][:160]}){hint}") from e
    if not isinstance(obj, (nn.Module, dict)):
        raise InputError(f"{path}: unpickled a {type(obj).__name__}, not an nn.Module or a state_dict")
    return obj


# ---- compressed.pt: weights plus a JSON spec, rebuilt without unpickling code ---------------------


def compressed_spec(arch: dict[str, Any], scheme: str, ranks: dict[str, int],
                    layer_schemes: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The decomposition a compressed model records: its dense architecture and each decomposed layer's scheme
    and rank. `scheme` may be 'auto'; each layer records its own (`layer_schemes`, default `scheme`)."""
    per = layer_schemes or {}
    spec = {"arch": arch, "scheme": scheme,
            "layers": {n: {"scheme": per.get(n, scheme), "rank": k} for n, k in ranks.items()}}
    spec.update(extra or {})
    return spec


def compressed_payload(model: nn.Module, arch: dict[str, Any], scheme: str, ranks: dict[str, int],
                       layer_schemes: dict[str, str] | None = None,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What compressed.pt holds: only tensors and strings, so torch.load(weights_only=True) reads it."""
    return _payload(model, compressed_spec(arch, scheme, ranks, layer_schemes, extra))


def _payload(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    sd = model.state_dict()
    weights = OrderedDict((k, v.detach().cpu()) for k, v in sd.items())
    weights._metadata = getattr(sd, "_metadata", None)  # module versions (MNASNet's loader needs its own)
    return COMPRESSED_MODEL.stamp({"spec": json.dumps(spec), "state_dict": weights})


def save_models(folder: Path, dense: nn.Module, compressed: nn.Module, spec: dict[str, Any],
                example: torch.Tensor) -> tuple[str, str]:
    """The trained dense model and the compressed one, as `compress` leaves them in its output folder:
    dense.pt (state_dict) and compressed.pt (weights + spec) for the families trp-edge rebuilds, and
    torch.export programs dense.pt2 / compressed.pt2 for any other model. Returns the two file names."""
    if spec["arch"]["family"] == exported.FAMILY:
        exported.save(dense, example, folder / "dense.pt2", {"arch": spec["arch"]})
        dense_file = "dense.pt2"
    else:
        torch.save(dense.state_dict(), folder / "dense.pt")
        dense_file = "dense.pt"
    return dense_file, save_compressed(folder, "compressed", compressed, spec, example)


def save_compressed(folder: Path, stem: str, model: nn.Module, spec: dict[str, Any], example: torch.Tensor) -> str:
    """A decomposed model as <stem>.pt (weights + spec) or, outside the known families, <stem>.pt2; its name."""
    if spec["arch"]["family"] == exported.FAMILY:
        exported.save(model, example, folder / f"{stem}.pt2", spec)
        return f"{stem}.pt2"
    torch.save(_payload(model, spec), folder / f"{stem}.pt")
    return f"{stem}.pt"


def _rebuild_compressed(obj: dict[str, Any], name: str, path: Path) -> LoadedModel:
    from ..lowrank import make_pair

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
