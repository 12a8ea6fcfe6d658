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


class OutputError(AnalysisError, OSError):
    """An output cannot be written: a read-only folder or file system, a full disk or quota, a
    path below a regular file, a directory where a file should go, an output folder in use.

    The message is one line naming the path and the reason (``results/x.json: cannot write (No
    space left on device)``); ``errno`` and ``filename`` are those of the operating system's
    error, when there was one.
    """

    @classmethod
    def from_os_error(
        cls, path: object, err: OSError, action: str = "cannot write", *, temporary: str = ""
    ) -> OutputError:
        """``"{path}: {action} ({reason})"`` for the ``OSError`` ``err`` met while writing
        ``path``; the reason names the file the system complained about when that is neither
        ``path`` nor a temporary file standing for it (a name beginning with ``temporary``):
        ``Not a directory: results``."""
        reason = err.strerror or str(err) or type(err).__name__
        shown = None if err.filename is None else str(err.filename)
        if (
            shown is not None
            and shown != str(path)
            and not (temporary and shown.startswith(temporary))
        ):
            reason = f"{reason}: {shown}"
        error = cls(f"{path}: {action} ({reason})")
        error.errno, error.strerror, error.filename = err.errno, err.strerror, err.filename
        return error
