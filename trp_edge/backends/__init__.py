"""Runtimes as same-shaped modules: tvm, ort, tflite. Each implements the runtime protocol of
trp_edge.backends.base (check_available, build, load, profile_ops, OPS_NOTE); `base.get(name)` returns one.
Heavy imports stay inside the functions, so a missing runtime is one clear line when it is used."""
