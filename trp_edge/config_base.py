"""What every config dataclass shares: the check that raises ConfigError, and JSON round trips."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


class _JSONMixin:
    @classmethod
    def of(cls, cfg: Any = None, /, **options: Any):
        """The config a workflow runs (the Python API): `cfg` as it is, or one made from keyword options named
        as the config's fields (a string `cfg` is the model)."""
        if isinstance(cfg, cls):
            _check(not options, f"{cls.__name__} given: set {', '.join(sorted(options))} in it, not beside it")
            return cfg
        if isinstance(cfg, str | os.PathLike):
            options = {"model": str(cfg), **options}
        elif cfg is not None:
            raise ConfigError(f"expected a {cls.__name__} or keyword options, got {type(cfg).__name__}")
        try:
            return cls.from_dict(options)
        except TypeError as e:  # a required option missing
            raise ConfigError(f"{cls.__name__}: {str(e).split('() ', 1)[-1]}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        _check(not unknown, f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**d)
