"""TVM 0.27 (Relax): ONNX -> Relax -> fused kernels -> (MetaSchedule-tuned) shared library for the
target's CPU and, where it has one, its GPU (OpenCL / CUDA / Vulkan through DLight schedules).

Untuned Relax code is not usable on a CPU (measured: ResNet-18 2.36 s untuned vs 72 ms in PyTorch), so
`--tune-trials N` tunes every fused kernel with MetaSchedule. The tuning database lives in
OUT/<target>/tuning/<hash>/ and is keyed by each kernel's structure (shapes included): a second build of the
same model and target tunes nothing, and the dense and compressed models share the kernels they have in
common. Candidates are timed where the model will run, at the deployment's threads, by a Measurer the caller
makes (trp_edge.tuning_device) and passes into `build`: this package reaches no device itself.

    runtime   on the device: loading, the VM and its threads, the per-op profile (numpy and the TVM runtime)
    lowering  ONNX import, preparation, packed convs, the default schedule, export, calibration grids
    tuning    the Measurer, the builder, the tuning database, tune and apply_database
    build     the backend's build

TVM itself is imported inside the functions: importing this package imports no tvm."""

from .build import build
from .lowering import (
    check_available,
    cpu_target,
    default_schedule,
    export,
    grid_library,
    import_onnx,
    lazy_tensor_intrin,
    lower_calibration,
    pack_convs,
    prepare,
)
from .runtime import load, load_signature, profile_ops, tvm_device, tvm_vm
from .tuning import UNCAPPED, Measurer, MeasurerFactory, apply_database, open_database, tune, tuning_dir

OPS_NOTE = None

__all__ = ["OPS_NOTE", "UNCAPPED", "Measurer", "MeasurerFactory", "apply_database", "build", "check_available",
           "cpu_target", "default_schedule", "export", "grid_library", "import_onnx", "lazy_tensor_intrin",
           "load", "load_signature", "lower_calibration", "open_database", "pack_convs", "prepare", "profile_ops",
           "tune", "tuning_dir", "tvm_device", "tvm_vm"]
