"""SIGTERM handled like Ctrl-C (a KeyboardInterrupt), for the commands that clean up when interrupted."""

from __future__ import annotations

import signal

_interrupted = False


def _raise_interrupt(signum, frame) -> None:
    # The flag is kept because a KeyboardInterrupt raised while native code (safetensors, torch) is
    # calling back into Python can be swallowed and resurface as an unrelated error, e.g. "could not
    # determine the shape of object type".
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def install_handlers() -> None:
    """SIGTERM, and SIGINT unless this process was started with it ignored, raise KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # keep SIGINT ignored if it is
        signal.signal(signal.SIGINT, _raise_interrupt)


def interrupted() -> bool:
    """Whether SIGINT or SIGTERM arrived since :func:`install_handlers`, even if the exception was lost."""
    return _interrupted
