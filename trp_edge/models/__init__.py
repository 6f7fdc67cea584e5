"""Models trp-edge can compress and rebuild (see `registry` for the families, `loading` for the sources)."""

from __future__ import annotations

from .cifar import CIFAR_DEPTHS, CifarResNet
from .loading import (
    COMPRESSED_FORMAT,
    LoadedModel,
    compressed_payload,
    compressed_spec,
    is_torchscript,
    load_model,
    model_file,
    module_spec,
    save_compressed,
    save_models,
)
from .registry import BUILTIN_NAMES, FAMILIES, build, builtin_spec, default_input_size, infer_spec
from .zoo import TV_RESNETS
from .zoo import builders as torchvision_builders

__all__ = ["BUILTIN_NAMES", "CIFAR_DEPTHS", "COMPRESSED_FORMAT", "FAMILIES", "TV_RESNETS", "CifarResNet", "LoadedModel",
           "build", "builtin_spec", "compressed_payload", "compressed_spec", "default_input_size", "infer_spec",
           "is_torchscript", "load_model", "model_file", "module_spec", "save_compressed", "save_models",
           "torchvision_builders"]
