"""The one user-error type of crln.

A :class:`CrlnError` means the user gave something wrong (a file, a key, an option). The CLI
prints its message as one line and exits with code 2; it is never shown as a traceback.
Messages name the file or key, what was found and what was expected.
"""

from __future__ import annotations

__all__ = ["CrlnError"]


class CrlnError(Exception):
    """A user error: bad input file, bad config key or value, bad CLI option."""
