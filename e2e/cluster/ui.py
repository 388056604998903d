"""Progress lines for long steps: one live line on a terminal, a line every so often in CI logs."""

import sys
import threading
import time
from contextlib import contextmanager


def fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Status:
    """A step's live status; `detail` may be updated from any thread while the step runs."""

    def __init__(self, label: str, every: float):
        self.label = label
        self.detail = ""
        self.start = time.monotonic()
        self._every = every
        self._done = threading.Event()
        self._tty = sys.stderr.isatty()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self) -> str:
        detail = f" {self.detail}" if self.detail else ""
        return f"  .. {self.label}{detail} [{fmt_duration(self.elapsed())}]"

    def _tick(self) -> None:
        while not self._done.wait(1.0 if self._tty else self._every):
            if self._tty:
                sys.stderr.write("\r\033[K" + self.line())
                sys.stderr.flush()
            else:
                say(self.line())

    def _clear(self) -> None:
        if self._tty:
            sys.stderr.write("\r\033[K")


@contextmanager
def step(label: str, every: float = 30.0):
    """Show `label` as running with its elapsed time, then `ok`/`FAILED` and the time taken."""
    status = Status(label, every)
    ticker = threading.Thread(target=status._tick, daemon=True)
    ticker.start()
    try:
        yield status
    except BaseException:
        status._done.set()
        ticker.join()
        status._clear()
        say(f"  !! {label} FAILED after {fmt_duration(status.elapsed())}")
        raise
    status._done.set()
    ticker.join()
    status._clear()
    say(f"  ok {label} ({fmt_duration(status.elapsed())})")
