"""Exceptions the engine raises; an API layer maps each to a status code.

InvalidRequestError and its subclasses are the client's fault (HTTP 400): they carry the
offending parameter and an OpenAI-style error code. ModelLoadError and its subclasses are raised
at start-up and always name the file and what is wrong with it.
"""

from __future__ import annotations


class HeadwiseError(Exception):
    """Base of every error headwise raises on purpose."""


class InvalidRequestError(HeadwiseError, ValueError):
    """A request the engine refuses before scheduling anything (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    """Prompt (plus max_tokens) does not fit the context window."""

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class UnknownRequestError(HeadwiseError, KeyError):
    """A request id the engine does not know (never added, or already finished and collected)."""


class EngineDeadError(HeadwiseError, RuntimeError):
    """The engine's loop thread has stopped; no request can be served."""


class ModelLoadError(HeadwiseError):
    """A model could not be loaded. The message names the file and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist or holds no model files."""


class CorruptModelError(ModelLoadError):
    """The file exists but cannot be parsed (truncated, wrong magic, bad tensor data)."""


class UnsupportedModelError(ModelLoadError):
    """A well-formed file of an architecture, tensor type or option headwise does not support."""
