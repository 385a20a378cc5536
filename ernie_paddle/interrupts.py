"""Ctrl-C, SIGTERM, a closed pipe and bad input end a command with one line and the conventional exit status.

SIGTERM is turned into an exception (`Terminated`) raised in the main thread, as Python does for Ctrl-C with
KeyboardInterrupt, so every `finally` and context manager runs: temporary folders are removed, nothing
half-written is kept. Both derive from BaseException, so `except Exception` never swallows them.
`run_command` is the one runner of every program (the CLIs and tools/): bad input (an ErnieError) is one
`error: ...` line and status 2, an unreadable or unwritable file (OSError) or exhausted memory one line and status 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from ernie_paddle.errors import ErnieError

SIGINT_STATUS = 128 + signal.SIGINT  # 130: what a shell reports for a command killed by Ctrl-C
SIGTERM_STATUS = 128 + signal.SIGTERM  # 143
SIGPIPE_STATUS = 128 + signal.SIGPIPE  # 141: as `yes | head` reports
BAD_INPUT_STATUS = 2  # as argparse ends a bad argument
FAILURE_STATUS = 1  # a file that cannot be read or written, or memory that ran out


class Terminated(BaseException):
    """The process received SIGTERM (raised in the main thread so that cleanup runs)."""


_received: int | None = None  # the signal being acted on, until run_command has reported it
_deferring = False  # inside `deferred()`: a signal is recorded, and raised when the block ends


def _exception(signum: int) -> BaseException:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _first_signal(signum: int, frame) -> None:
    global _received
    _received = signum
    # Later signals are ignored so the cleanup this one starts is not cut short (SIGKILL still ends it).
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if not _deferring:
        raise _exception(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold an interrupt back until the block ends: an import of a C extension that it cuts short can leave the
    process to crash, or to end by the signal after the interrupt was reported (Paddle's import does both)."""
    global _deferring
    before, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = before
    raise_if_interrupted()


def raise_if_interrupted() -> None:
    """Raise the interrupt again if it was lost. A handler's exception can be swallowed by C code that clears
    errors (seen inside numpy's import, in `abc.__subclasscheck__`), so long loops call this between steps."""
    if _received is not None:
        raise _exception(_received)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated; then as before."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _first_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _forget_unhandled_interrupt() -> None:
    """Clear CPython's record of an interrupt that escaped code run by `PyRun_String` (which C extensions call):
    after `python -m`, that record makes the interpreter end itself by SIGINT instead of with our status. Running an
    empty string through the same function resets it."""
    import ctypes

    ctypes.pythonapi.PyRun_SimpleString(b"")


def _stdout_to_devnull() -> None:
    """The reader of stdout has gone (`| head`): send what is still buffered nowhere, so exit prints no error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_command(command: Callable[[], int], prog: str) -> int:
    """Run `command` and return its exit status. Bad input ends it with one `error: ...` line on stderr and status
    2, an OSError or MemoryError with one line and status 1; an interrupt or a closed stdout with one line (none
    for the pipe: its reader is gone on purpose) and 130 (Ctrl-C), 143 (SIGTERM) or 141 (closed pipe)."""
    global _received
    _received = None
    try:
        with signals_as_exceptions():
            try:
                status = command()
            except Exception:  # an interrupt can surface as another error: an import it cut short (a C
                raise_if_interrupted()  # extension's module init) fails with ImportError; it is the interrupt
                raise
            sys.stdout.flush()  # a closed pipe is reported here, not at interpreter exit
            raise_if_interrupted()  # one that was swallowed and found no later step still sets the status
            return status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (SIGINT)", file=sys.stderr, flush=True)
        _forget_unhandled_interrupt()
        return SIGINT_STATUS
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr, flush=True)
        return SIGTERM_STATUS
    except BrokenPipeError:  # an OSError, but no error: the reader of stdout has gone
        _stdout_to_devnull()
        return SIGPIPE_STATUS
    except ErnieError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return BAD_INPUT_STATUS
    except (OSError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return FAILURE_STATUS
