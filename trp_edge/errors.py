"""The few error types trp-edge raises. Each message is one line that says what to do."""


class TrpEdgeError(Exception):
    """Base of every error meant for the user (the CLI prints it as one line, exit code 1)."""


class InputError(TrpEdgeError):
    """A model file, architecture, data set or output directory that cannot be used."""


class ConfigError(TrpEdgeError, ValueError):
    """An option out of range or options that contradict each other."""


class ValidationError(TrpEdgeError):
    """A converted artifact does not match torch within tolerance."""

    def __init__(self, message: str, max_abs_diff: float | None = None):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
