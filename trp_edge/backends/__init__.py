"""Runtimes as same-shaped modules: tvm, ort, tflite. Each has

    check_available(target, source)                  -> None, or one clear error before any work
    build(source, target, folder, cfg, samples)      -> (list[Artifact], extra manifest keys)

and leaves running the artifacts to trp_edge.device.runner (the device side, numpy only)."""
