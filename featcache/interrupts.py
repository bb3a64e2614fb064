"""Ctrl-C (SIGINT) and SIGTERM during long work (training, extraction, a sweep): the first
signal asks the work to stop at its next safe point (the end of the epoch in progress, the
shards being written), where it keeps what it has done and raises ``Interrupted`` saying so;
a second signal stops it at once.

    with stop_on_signal("stopping after the epoch in progress"):
        for epoch in ...:
            ...
            name = stop_requested()      # "SIGINT", "SIGTERM" or None
            if name:
                save(); raise Interrupted(f"Stopped by {name} ...", name)

The outermost ``stop_on_signal`` of the main thread installs the handlers and restores the
previous ones when it exits (signal handlers live in the main thread; in any other thread the
context changes nothing). Nested contexts (a fit inside a sweep) share one request, so a
Ctrl-C between two of a sweep's fits still stops the sweep before the next. The first signal
prints the innermost context's notice on stderr, at once; the second raises
``Interrupted(at_once=True)`` wherever the main thread is, and whoever catches it says what was
kept. The request is forgotten when the outermost context exits.

Work with no safe point to wait for (a fit's setup: opening stores, loading an encoder; its
test evaluation) runs in ``stop_at_once_on_signal``: there the first signal raises
``Interrupted`` at once, and the caller says what is kept. A ``stop_on_signal`` nested in it
(the training loop) defers the signal again; the innermost context decides.

Processes started inside ``children_ignore_ctrl_c`` (a local Dask cluster's workers) ignore
SIGINT: a Ctrl-C in a terminal goes to every process of the foreground group, and a worker must
finish its task while the command that owns it stops at its safe point.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from featcache.errors import Interrupted

__all__ = [
    "STOP_SIGNALS",
    "children_ignore_ctrl_c",
    "stop_at_once_on_signal",
    "stop_on_signal",
    "stop_requested",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Requests:
    """The one stop request of this process and the handlers it replaced."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.notices: list[str | None] = []  # one per open context, innermost last; None:
        # a stop_at_once_on_signal context
        self.previous: dict[int, object] = {}


_requests = _Requests()


def stop_requested() -> str | None:
    """The name of the signal that asked the work to stop ("SIGINT", "SIGTERM"), or None."""
    return _requests.signal_name


def _again(name: str) -> str:
    return "press Ctrl-C again" if name == "SIGINT" else f"a second {name}"


def _handle(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    first = _requests.signal_name is None
    if first:
        _requests.signal_name = name
    if first and _requests.notices[-1] is not None:
        notice = f"\n{name}: {_requests.notices[-1]}; {_again(name)} to stop at once.\n"
        os.write(2, notice.encode())  # not through a console: a handler may run mid-print
        return
    if first:  # innermost context: stop_at_once_on_signal
        raise Interrupted(f"Stopped by {name}.", name)
    raise Interrupted(f"Stopped at once by a second {name}.", name, at_once=True)


@contextlib.contextmanager
def stop_on_signal(notice: str) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM request a stop (module docstring); ``notice``
    (what the work does now: "stopping after the epoch in progress") is printed on the first."""
    with _context(notice):
        yield


@contextlib.contextmanager
def stop_at_once_on_signal() -> Iterator[None]:
    """While the block runs (outside a nested ``stop_on_signal``), SIGINT and SIGTERM raise
    ``Interrupted`` at once: ``at_once`` False for the first signal (there was no safe point
    to wait for), True for a second; the caller says what is kept."""
    with _context(None):
        yield


@contextlib.contextmanager
def _context(notice: str | None) -> Iterator[None]:
    """Open one context: the outermost of the main thread installs the handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = not _requests.notices
    if outermost:
        _requests.signal_name = None
        _requests.previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    _requests.notices.append(notice)
    try:
        yield
    finally:
        _requests.notices.pop()
        if outermost:
            for signum, handler in _requests.previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)
            _requests.signal_name = None


@contextlib.contextmanager
def children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started while the block runs ignore SIGINT (an ignored signal stays ignored
    across fork and exec, and Python then installs no KeyboardInterrupt handler); this process
    ignores it meanwhile too. Main thread only; elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
