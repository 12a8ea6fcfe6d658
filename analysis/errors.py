"""Errors that mean "the user's input is wrong" (exit code 2 in the CLI).

Every error here carries a one-line message that names the file, YAML path or branch and says
what was expected. Each class also inherits the builtin that fits its meaning (as hist and botorch
do), so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations


class AnalysisError(Exception):
    """Root of all user-input errors raised by diffana."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(AnalysisError, ValueError):
    """An analysis configuration (YAML) or cuts file is invalid."""


class InputFileError(AnalysisError, FileNotFoundError):
    """An input file is missing or cannot be read as what it should be."""


class MissingObjectError(AnalysisError, KeyError):
    """A tree or branch named in the configuration is not in the file."""


class DataError(AnalysisError, ValueError):
    """Input data are unusable: NaN values, an empty selection, a truncated file."""
