"""One error path: everything a user can fix is a UserError; the CLI prints it on one line and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. The message says what is wrong and how to fix it.

    >>> str(UserError("model not found: a.onnx", "check the path"))
    'model not found: a.onnx — check the path'
    """

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} — {fix}" if fix else what)


class ModelError(UserError):
    """The model file is missing, unreadable, invalid, or cannot run."""


class DataError(UserError):
    """The data does not exist, is empty, corrupt, or does not match the model's inputs."""


class OutputError(UserError):
    """An output cannot be written where the user asked."""


class ConfigError(UserError):
    """Options that contradict each other or name something unknown."""
