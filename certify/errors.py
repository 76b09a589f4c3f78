"""Exceptions raised by the lipcert library.

Library code raises these precise exceptions; only the command-line interface turns them into
one-line messages and exit codes (see :mod:`certify.cli`).
"""

from __future__ import annotations


class LipcertError(Exception):
    """Base class of every error lipcert raises on purpose."""


class UnknownModelError(LipcertError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateModelError(LipcertError, ValueError):
    """A second builder registered under a name that is already taken."""


class CheckpointError(LipcertError):
    """A checkpoint that cannot be read, or whose contents do not fit its model."""


class DataError(LipcertError):
    """A dataset that is missing, empty, or whose images do not fit the model."""


class ConfigError(LipcertError, ValueError):
    """An option value that is out of range or inconsistent with other options."""


class NotLipschitzError(LipcertError):
    """A model for which lipcert cannot compute a sound Lipschitz upper bound."""


class ExportError(LipcertError):
    """An export that failed or whose result does not match the original model."""


class RunFolderError(LipcertError):
    """A run folder that exists already (without --resume/--overwrite) or cannot be written."""
