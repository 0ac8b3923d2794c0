"""The one error type the loaders raise."""
from __future__ import annotations


class ModelLoadError(Exception):
    """A model could not be resolved, converted or loaded.

    str() is a single line saying what is wrong and naming the path, ready for `error: ...` in the CLI.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
