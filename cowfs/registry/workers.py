"""A few threads for one client's transfers (a pull's layers, a push's layers), run so that the
first error or a Ctrl-C stops them all at once, and reliably.

The main thread only waits while the workers run, and a KeyboardInterrupt raised into that wait
by Python's default SIGINT handler is not reliable, for two reasons found in CPython (3.11):

  * a SIGINT that comes just before the main thread blocks on a lock (in ThreadPoolExecutor's
    submit or in concurrent.futures.wait, which the workers keep busy) is handled at C level but
    does not wake the thread: it sleeps on until a worker finishes, and a worker stalled on the
    network does not finish (the socket timeout, if the server does not let go before);
  * a KeyboardInterrupt raised between the acquire and the release of a lock inside threading or
    concurrent.futures leaves the lock held: the worker that finishes next blocks on it, and
    pool.shutdown(wait=True) waits forever.

So while workers run, Ctrl-C only records itself (when SIGINT has Python's default handler and
this is the main thread: a handler is the main thread's to set), the main thread waits in short
steps so that it runs Python code, and with it the recording handler, however the signal came;
it then aborts the client (every socket shut down, no new connection, no retry) and raises
KeyboardInterrupt itself, outside any lock.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from cowfs.registry.client import RegistryClient

POLL = 0.1  # seconds: the longest a Ctrl-C waits to be seen while workers run
T = TypeVar("T")


class Workers:
    """`with Workers(client, jobs, name) as workers: results = workers.run(tasks)`.

    Ctrl-C inside the `with` block is raised as KeyboardInterrupt by run(), after every worker
    has stopped, or on leaving the block, never in the middle of it: what the block creates
    (a staging directory) is cleaned up by its own `finally`.
    """

    def __init__(self, client: RegistryClient, jobs: int, name: str) -> None:
        self.client = client
        self.jobs = jobs
        self.name = name
        self.cancel = threading.Event()  # set when the workers are to stop; tasks may check it
        self.interrupted = False  # Ctrl-C seen
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Workers:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        if self.interrupted and not isinstance(exc, KeyboardInterrupt):
            # Ctrl-C came while the workers were stopping, or it made one fail: it wins.
            raise KeyboardInterrupt

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, maybe inside a lock's bookkeeping in
        # threading: record only; take no lock, raise nothing.
        self.interrupted = True

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Run `tasks` on up to `jobs` threads and return their results in order. The first
        error or Ctrl-C sets `cancel`, aborts the client's transfers and is raised once every
        worker has stopped."""
        if not tasks:
            return []
        pool = ThreadPoolExecutor(
            max_workers=max(1, min(self.jobs, len(tasks))), thread_name_prefix=self.name
        )
        futures: list[Future[T]] = []
        try:
            futures = [pool.submit(task) for task in tasks]
            pending: set[Future[T]] = set(futures)
            while pending:
                # In short steps: a SIGINT whose wake-up was lost is seen at the next one.
                done, pending = wait(pending, timeout=POLL, return_when=FIRST_EXCEPTION)
                if self.interrupted:
                    raise KeyboardInterrupt
                for fut in futures:  # the first failed task in their order, not the set's
                    error = fut.exception() if fut in done else None
                    if error is not None:
                        raise error
            return [fut.result() for fut in futures]
        except BaseException:
            self.cancel.set()
            for fut in futures:
                fut.cancel()
            self.client.abort()  # workers blocked on the network get an error now
            raise
        finally:
            pool.shutdown(wait=True)
