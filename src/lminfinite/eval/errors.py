"""The tools' exception types: unusable user input, and model output that cannot be trusted.

- `BadInput` (and its subclasses `BadValue`, `BadFile`, `MissingDependency`): raised where the
  tools check what a user gave them (files, sizes, method names, sampling settings, output
  paths, optional packages). The CLI reports these as one line and exit code 2. Each subclass
  also derives from the built-in exception a library caller would expect (`ValueError`,
  `FileNotFoundError`, `ImportError`).
- `NonFiniteError` (from `lminfinite.streaming`): the model's logits or NLL are NaN or infinite;
  the message names the method and the position. The CLI reports it with exit code 1.

Anything else reaching the CLI is a bug: it says "internal error" and exits with code 3.
"""

from __future__ import annotations

__all__ = ["BadFile", "BadInput", "BadValue", "MissingDependency", "NonFiniteError"]  # noqa: F822 (lazy, see __getattr__)


class BadInput(Exception):
    """Input the user gave (a file, a size, a name, a setting) cannot be used."""


class BadValue(BadInput, ValueError):
    """A value the user gave is out of range or malformed."""


class BadFile(BadInput, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingDependency(BadInput, ImportError):
    """An optional package the asked-for feature needs is not installed."""


def __getattr__(name: str):
    # NonFiniteError lives with stream() in the core; imported on first use, so that importing these error
    # types (the CLI does, to parse its arguments) does not import torch.
    if name == "NonFiniteError":
        from ..streaming import NonFiniteError

        return NonFiniteError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
