"""The error types trp-edge raises. Each message is one line that says what to do.

    TrpEdgeError            base of every error meant for the user (the CLI prints one line, exit code 1)
      InputError            a model file, architecture, data set or output directory that cannot be used
        ContractError       a file or message of another format, or of a newer version than this trp-edge reads
      ConfigError           an option out of range, options that contradict each other
      ValidationError       a converted artifact does not match torch within tolerance
      ConversionError       a converter (ONNX export, TFLite, TVM import) failed on the model
      MissingTool           a runtime, converter, compiler or emulator that is not installed here
      DeviceError           the device could not be reached, refused the session, or the run failed there
        DeviceTimeout       ... or did not answer in time (also a TimeoutError)
      Interrupted           training stopped on request (Ctrl-C) after saving a checkpoint
"""


class TrpEdgeError(Exception):
    """Base of every error meant for the user (the CLI prints it as one line, exit code 1)."""


class InputError(TrpEdgeError):
    """A model file, architecture, data set or output directory that cannot be used."""


class ContractError(InputError):
    """A file or message one stage hands the next is of another format, or of a newer version than this reads."""


class ConfigError(TrpEdgeError, ValueError):
    """An option out of range or options that contradict each other."""


class ValidationError(TrpEdgeError):
    """A converted artifact does not match torch within tolerance."""

    def __init__(self, message: str, max_abs_diff: float | None = None):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


class ConversionError(TrpEdgeError):
    """A converter (torch.onnx, litert-torch, TVM's ONNX frontend) failed on the model."""


class MissingTool(TrpEdgeError):
    """A runtime, converter environment, cross compiler or emulator is not installed here."""


class DeviceError(TrpEdgeError):
    """The device could not be reached, refused the session, or the run failed there."""


class DeviceTimeout(DeviceError, TimeoutError):
    """The device (or the emulator) did not finish within the time allowed."""


class Interrupted(TrpEdgeError):
    """Training stopped on request (Ctrl-C) after saving a checkpoint."""
