"""Exceptions the project raises for bad input; the CLIs print them as one line, without a traceback."""

from __future__ import annotations


class ErnieError(Exception):
    """Base class: a user-facing error whose message names the file, tensor, field or argument at fault."""


class ConfigError(ErnieError, ValueError):
    """config.json is missing a field, has a wrong value, or names an unsupported model_type."""


class CheckpointError(ErnieError, ValueError):
    """A checkpoint file or tensor is missing, truncated, mis-shaped or of an unexpected dtype."""


class InputError(ErnieError, ValueError):
    """Bad arguments to the model or to generation (token ids out of range, bad sampling values...)."""


class ConfigDefaultWarning(UserWarning):
    """A config field was missing and a default was filled in (turned into ConfigError by strict mode)."""


class ExportError(ErnieError):
    """An export cannot be done as asked (bad options, a limit of the toolchain, or failed verification)."""


class TokenizerError(ErnieError):
    """A tokenizer file is missing, unreadable or corrupt."""


class OnnxFolderError(ErnieError):
    """An exported folder is incomplete, corrupt, or does not match its manifest."""


class KVFileError(ErnieError):
    """A saved KV state (a prompt cache, a server's prefix cache) is unreadable or belongs to another model."""
