"""The typed errors loratool raises for user mistakes, each with a stable code and an exit code.

Library code raises these and never prints or exits; the CLI renders them once, as
``error[code]: message`` plus ``hint: ...`` on stderr, and exits with ``exit_code``.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

# Documented exit codes (README "Exit codes", spec §7). 1 is left to Python for bugs.
EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INVALID_FILE = 3
EXIT_INCOMPATIBLE = 4
EXIT_HUB = 5
EXIT_TRAINING = 6
EXIT_DISK_FULL = 7
EXIT_INTERRUPTED = 130


class LoratoolError(Exception):
    """A user-facing failure: bad input, not a bug."""

    exit_code = EXIT_BUG
    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        hint: str | None = None,
        where: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.hint = hint
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UsageError(LoratoolError):
    """A bad flag, option combination or argument."""

    exit_code = EXIT_USAGE
    default_code = "usage"


class FormatError(LoratoolError):
    """A file that breaks a spec rule (the code is the rule's code, spec §6)."""

    exit_code = EXIT_INVALID_FILE
    default_code = "invalid-file"


class CompatibilityError(LoratoolError):
    """An adapter that does not fit the base model it is applied to."""

    exit_code = EXIT_INCOMPATIBLE
    default_code = "incompatible-base"


class HubError(LoratoolError):
    """A Hub or network failure: missing repo, revision or file, auth, connection."""

    exit_code = EXIT_HUB
    default_code = "hub"


class TrainingError(LoratoolError):
    """Training stopped: non-finite loss, bad data, or a checkpoint that cannot resume."""

    exit_code = EXIT_TRAINING
    default_code = "training"


class OutputExistsError(UsageError):
    """The output path already exists and ``--force`` was not given."""

    default_code = "output-exists"


class OutputBusyError(UsageError):
    """Another live loratool process is writing the same output right now."""

    default_code = "output-busy"


class DiskFullError(LoratoolError):
    """A write ran out of space or quota (ENOSPC, EDQUOT, EFBIG); nothing partial was left."""

    exit_code = EXIT_DISK_FULL
    default_code = "disk-full"
