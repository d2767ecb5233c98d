"""The error types of crln and the exit codes the ``crln`` command gives them.

A :class:`CrlnError` means the user gave something wrong (a file, a key, an option). The CLI
prints its message as one line and exits with code 2; it is never shown as a traceback.
Messages name the file or key, what was found and what was expected.

Two ways a run can stop are not bad input and have their own codes: :class:`TrainingDiverged`
(a non-finite loss or weight; code 3) and :class:`RunInterrupted` (SIGINT or SIGTERM during
training, checkpoint saved; code 128 + the signal's number, as a shell reports a process killed by
it: 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal

__all__ = ["EXIT_DIVERGED", "EXIT_USER_ERROR", "CrlnError", "RunInterrupted", "TrainingDiverged"]

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class CrlnError(Exception):
    """A user error: bad input file, bad config key or value, bad CLI option."""


class TrainingDiverged(CrlnError):
    """The loss or the weights became non-finite; the last good checkpoint is kept.

    Args:
        message: what diverged, where, and what to try.
        iteration: the 1-based iteration at which it was found (the one whose loss was non-finite, or the one
            after which the weights were); for callers that record it (``crln bench``) without parsing the text.
    """

    def __init__(self, message: str, iteration: int | None = None) -> None:
        super().__init__(message)
        self.iteration = iteration


class RunInterrupted(Exception):
    """Training stopped on a signal after saving its checkpoint (not an error: resume it).

    Args:
        message: what happened and how to continue.
        signal_name: ``"SIGINT"`` or ``"SIGTERM"`` (``None``: another process of the job got it).
        stopped: what happened alone (default ``message``), for a caller that continues the run another way
            (``crln bench`` resumes it when run again; it has no ``--resume``).
    """

    def __init__(self, message: str, signal_name: str | None = None, stopped: str | None = None) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.stopped = stopped or message

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for SIGINT and when unknown, 143 for SIGTERM)."""
        number = signal.Signals[self.signal_name] if self.signal_name in signal.Signals.__members__ else signal.SIGINT
        return 128 + int(number)
