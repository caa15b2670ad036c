"""Stopping a llama.cpp decode while it runs.

``llama_decode`` on a long prompt is one C call (seconds on a Pi, 10 s for 1,500 tokens of the
135M model on 2 cores here), and a server's request that timed out or whose client went away
would hold the runtime until it ends. llama.cpp checks an abort callback between the graph's
nodes (``llama_set_abort_callback``; a decode that aborts returns 2, and llama-cpp-python
raises ``RuntimeError("llama_decode returned 2")``).

The callback is libc's ``strlen`` on a two-byte buffer: ``b"\\0"`` goes on, ``b"x"`` (length 1,
true) aborts. A Python callback would work too, but llama.cpp calls it after every node (~600 a
token for the 135M model) and each call must take the GIL: 5 % slower measured idle here, and a
wait of up to Python's switch interval (5 ms) per node whenever a server thread runs Python.
``strlen`` reads one byte and never touches the GIL; its ``size_t`` result 0 or 1 is what a
``bool`` return reads on every ABI llama.cpp runs on (the value sits in the return register).
Hand-written: llama-cpp-python exposes the setter but no cancellation of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

from .base import Cancel, Interrupted

ABORTED = "llama_decode returned 2"


def _strlen():
    for name in (ctypes.util.find_library("c"), None):  # None: the symbols already loaded
        try:
            return ctypes.cast(ctypes.CDLL(name).strlen, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


class AbortFlag:
    """An abort flag installed on one llama.cpp context (None where libc's strlen cannot be
    found: then a generation stops between tokens only)."""

    def __init__(self, llama_cpp, ctx) -> None:
        self._flag = ctypes.create_string_buffer(2)
        address = _strlen()
        self.installed = address is not None
        if self.installed:
            # Both kept on the object: llama.cpp holds raw pointers to them.
            self._callback = llama_cpp.ggml_abort_callback(address)
            llama_cpp.llama_set_abort_callback(ctx, self._callback,
                                               ctypes.cast(self._flag, ctypes.c_void_p))

    def _trip(self) -> None:
        self._flag[0] = b"x"

    @contextlib.contextmanager
    def armed(self, cancel: Cancel):
        """While the block runs, ``cancel.set()`` aborts the decode in progress; the aborted
        decode comes out as ``Interrupted``."""
        self._flag[0] = b"\0"
        try:
            with cancel.hooked(self._trip):
                yield
        except RuntimeError as exc:
            if ABORTED in str(exc) and cancel.is_set():
                raise Interrupted() from None
            raise
        finally:
            self._flag[0] = b"\0"
