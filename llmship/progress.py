"""Progress display: a bar for counted loops, an elapsed-time line for long opaque steps (conversions).
Both show on a terminal and stay silent when output is not a TTY (CI logs keep the stage lines only)."""
from __future__ import annotations

import contextlib
import threading


def bar(iterable, desc: str, total: int | None = None, unit: str = "tok"):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, unit=unit, mininterval=1.0, disable=None)


@contextlib.contextmanager
def stage(desc: str):
    """An elapsed-time indicator for a step that reports no progress of its own (e.g. a converter)."""
    from tqdm import tqdm

    import os
    import sys

    # Its own handle on the terminal: converters run with stderr pointed at /dev/null (exporters.quiet).
    try:
        out = os.fdopen(os.dup(sys.stderr.fileno()), "w") if sys.stderr.isatty() else sys.stderr
    except (OSError, ValueError, AttributeError):
        out = sys.stderr
    line = tqdm(desc=desc, total=None, bar_format="{desc} {elapsed}", leave=False, disable=None, file=out)
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            line.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        line.close()
        if out is not sys.stderr:
            out.close()


def say(msg: str, err: bool = False) -> None:
    """One line for the user: progress on stdout, a gate failure on stderr."""
    import sys

    print(("llmship: gate failed: " if err else "") + msg, file=sys.stderr if err else sys.stdout, flush=True)
