"""How a loki-dist process ends: a Ctrl-C is exit status 130 with no traceback, whenever it comes.

The entry point (loki_dist/__main__.py, also the console script) calls `install` before anything heavy
imports: for seconds torch, transformers and DeepSpeed are still importing, and a KeyboardInterrupt there
was a traceback, or was swallowed by an importing library (a run under test went on past the Ctrl-C).
Until the command itself runs (`running`), nothing is there to leave or clean up, so a Ctrl-C ends the
process at once. From then on the handler raises KeyboardInterrupt as Python's own does, so that cli.main
leaves the process group, and remembers that it did: a library may turn it into an error of its own
(transformers' lazy imports, interrupted half-way, report a module that "could not be imported", which
loki_dist would say as a broken tokenizer, exit 2), and `as_interrupt` turns such an error back into the
interrupt.

`exit_now` leaves without the interpreter's finalization, after the exit handlers and a flush: cli.main
ends that way for one rank of several (see cli._exit) and after a Ctrl-C. CPython's `-m` runner kills
the process with SIGINT at exit, whatever status it asked for, once a KeyboardInterrupt has ended any
code run through PyRun_String (as C extensions run embedded Python while they import): sys.exit(130)
came out as signal 2 in about 1 of 4 interrupts during start-up (measured on this code base).
"""

from __future__ import annotations

import _thread
import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import NoReturn

INTERRUPTED = 130  # what a shell reports for a command ended by SIGINT (128 + 2)
_seen = False
_starting = True


def install() -> None:
    """Take over SIGINT from Python's own handler (where it has it: a job started in the background keeps
    ignoring SIGINT, as its shell wanted)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
        sys.unraisablehook = _unraisable


def _unraisable(unraisable, _previous=sys.unraisablehook) -> None:
    """A KeyboardInterrupt raised inside a finalizer (a `__del__`, a weakref callback: a library's objects
    collected during the run) is printed by Python as "Exception ignored" and dropped, and the run went
    on past the Ctrl-C (seen under test: training continued). Deliver the signal again instead, so that
    the interrupt is raised where the code runs next."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        # raised from here it would be dropped again: trip the signal a moment later, from another
        # thread, once the finalizer is left (a later finalizer catching it again comes back here)
        threading.Timer(0.05, _thread.interrupt_main, (signal.SIGINT,)).start()
        return
    _previous(unraisable)


def running() -> None:
    """The command runs from here on: a Ctrl-C is a KeyboardInterrupt (see the top)."""
    global _starting
    _starting = False


def _interrupt(signum: int, frame) -> None:
    global _seen
    _seen = True
    if _starting:  # no exit handlers: the interrupted import may hold what they would need
        with suppress(Exception):
            sys.stderr.flush()
        os._exit(INTERRUPTED)
    raise KeyboardInterrupt


@contextmanager
def as_interrupt() -> Iterator[None]:
    """An error raised after a Ctrl-C is the Ctrl-C (a library made it of the KeyboardInterrupt)."""
    try:
        yield
    except Exception:
        if _seen:
            raise KeyboardInterrupt from None
        raise


def exit_now(code: int) -> NoReturn:
    """Exit with `code` now: exit handlers, a flush, and no finalization (see the top)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
