"""Ctrl-C in the command line: the process ends where the SIGINT lands, with the CLI's one line and
its status, instead of raising a KeyboardInterrupt there.

The planner runs torch code where a KeyboardInterrupt never reaches the CLI's ``except``: raised in
a weakref callback (torch.utils.weak's WeakIdKeyDictionary drops its keys as tensors are freed) it
is printed as "Exception ignored" and dropped, and planning goes on to status 0; raised in a Python
function that torch calls from C++ while torch.export traces (a dispatch rule), it ends the process
in std::terminate (SIGABRT). Both were seen with the 7B preset on a loaded machine. A handler that
never raises has neither.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable


class EndsTheProcess:
    """While active (``with``), SIGINT runs each of `cleanups` (e.g. a rich status's ``stop``, which
    shows the terminal's cursor again), then `say`, flushes stdout and stderr, and ends the process
    with `status` (``os._exit``: nothing of the interrupted code runs on). It takes SIGINT only from
    Python's default handler on the main thread: a caller that set its own handling (a handler,
    SIG_IGN), or runs this off the main thread, keeps that."""

    def __init__(self, say: Callable[[], object], status: int) -> None:
        self.say, self.status = say, status
        self.cleanups: list[Callable[[], object]] = []
        self._previous = None

    def __enter__(self) -> EndsTheProcess:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._interrupted)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _interrupted(self, signum: int, frame: object) -> None:
        try:
            for cleanup in self.cleanups:
                cleanup()
            self.say()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:  # even if a stream is closed or busy: the status is what callers read
            os._exit(self.status)
