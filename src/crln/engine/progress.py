"""Progress of a long loop: a live bar on a terminal, plain lines in a log file.

tqdm redraws its bar with a carriage return after every iteration. On a terminal that is one
line updating in place; in a file (CI logs, ``nohup``, a notebook's captured output) every frame
stays, so a 1000-iteration run left a single line of megabytes. :func:`progress_bar` therefore
returns the tqdm bar only when the stream is a terminal, and otherwise a :class:`PlainProgress`
that writes one readable line every few percent.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

__all__ = ["PlainProgress", "Progress", "format_duration", "progress_bar"]


class Progress(Protocol):
    """What the training loop calls on its progress display."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, *, refresh: bool = True, **values: Any) -> Any: ...

    def close(self) -> Any: ...


def format_duration(seconds: float) -> str:
    """``75`` → ``"1:15"``, ``3725`` → ``"1:02:05"`` (as tqdm writes its ETA)."""
    minutes, secs = divmod(round(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """One line per ``every_percent`` of the loop: ``desc: iteration k/N (p%)  loss …  s/it  ETA``.

    Args:
        total: iterations of the whole loop.
        initial: iterations already done (a resumed run).
        desc: name at the start of each line.
        every_percent: print when the loop has crossed another such share of ``total`` (and at the end).
        stream: where the lines go (default stderr, like tqdm).
    """

    def __init__(
        self, total: int, initial: int = 0, desc: str = "", every_percent: float = 5.0, stream: TextIO | None = None
    ) -> None:
        self.total, self.done, self.desc = total, initial, desc
        self._every = max(1, round(total * every_percent / 100))
        self._stream = stream
        self._postfix: dict[str, Any] = {}
        self._window_start, self._window_done = time.perf_counter(), initial
        self._last_printed = initial

    def set_postfix(self, *, refresh: bool = True, **values: Any) -> None:
        del refresh  # nothing is redrawn: the values go into the next line
        self._postfix = values

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done // self._every > self._last_printed // self._every or self.done == self.total:
            self._print()

    def close(self) -> None:
        if self.done != self._last_printed:
            self._print()

    def _print(self) -> None:
        now = time.perf_counter()
        per_it = (now - self._window_start) / max(self.done - self._window_done, 1)
        fields = [f"iteration {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)"]
        fields += [f"{key} {value}" for key, value in self._postfix.items()]
        fields += [f"{per_it:.2f} s/it", f"ETA {format_duration(per_it * (self.total - self.done))}"]
        prefix = f"{self.desc}: " if self.desc else ""
        print(prefix + "  ".join(fields), file=self._stream or sys.stderr, flush=True)
        self._window_start, self._window_done, self._last_printed = now, self.done, self.done


def progress_bar(total: int, initial: int = 0, desc: str = "", stream: TextIO | None = None) -> Progress:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`PlainProgress` lines."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)
    return PlainProgress(total, initial, desc, stream=stream)
