"""Run llama.cpp work in a child process, so that a crash inside it (an instruction this CPU or kernel does not grant
kills the process with SIGILL) ends in one line of advice instead of taking the caller down with it.

llama.cpp is compiled code: when it dies it does not raise, the process is killed by a signal. The child is started
with `spawn` (never `fork`: the parent may hold CUDA or torch's thread pools), runs one function and sends back its
result or the text of the exception it raised.
"""

from __future__ import annotations

import multiprocessing
import signal

# Rebuilds llama-cpp-python with flags that do not depend on the machine it is built on (scripts/install_llama_cpp.sh)
REBUILD_LLAMA_CPP = "sh scripts/install_llama_cpp.sh"


class ChildCrashed(RuntimeError):
    """The child died without answering: killed by a signal, or exited without a result."""

    def __init__(self, what: str, exitcode: int | None):
        self.exitcode = exitcode
        self.signal = signal.Signals(-exitcode).name if exitcode and exitcode < 0 else None
        how = f"was killed by {self.signal}" if self.signal else f"exited with code {exitcode}"
        super().__init__(f"{what} {how}")


class ChildFailed(RuntimeError):
    """The function raised in the child; the message is its type and text."""


def _child(connection, func, args) -> None:
    try:
        connection.send(("ok", func(*args)))
    except Exception as err:  # the parent raises it again as ChildFailed, with the same words
        connection.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        connection.close()


def run_isolated(what: str, func, *args):
    """`func(*args)` in a fresh process; its return value, or ChildCrashed / ChildFailed. `func` and its arguments are
    sent by name and value (module-level function, picklable arguments); `what` names the work in the message."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, func, args), daemon=True)
    process.start()
    send.close()  # the child holds the only sending end: a dead child means EOF here, not a hang
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = None, None
    process.join()
    if status is None:
        raise ChildCrashed(what, process.exitcode)
    if status == "error":
        raise ChildFailed(f"{what}: {value}")
    return value
