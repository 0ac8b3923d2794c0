"""Errors that mean bad user input (shown as one line by the CLI and as 4xx by the server)."""
from __future__ import annotations

from idlm.engine.llm_engine import PromptTooLongError
from idlm.loading.errors import ModelLoadError

USER_ERRORS: tuple[type[BaseException], ...] = (ModelLoadError, PromptTooLongError, ValueError, FileNotFoundError)
