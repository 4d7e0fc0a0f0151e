"""The clock devices are given: timed callbacks on one daemon thread (:class:`Scheduler`), so a
device model arms a timer (the RTC's next alarm or update, the PM timer's overflow, VT-d's
deferred invalidation work) without owning a thread."""
from __future__ import annotations

import heapq
import itertools
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional


class Scheduler:
    """Timed callbacks on one daemon thread (monotonic nanoseconds). ``schedule(key, when,
    fn)`` replaces the pending event of the same key. A callback that raises is counted in
    ``failures`` (its traceback kept in ``last_failure``) and the thread goes on."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns):
        self.clock = clock
        self._cond = threading.Condition()
        self._heap: List[tuple] = []
        self._live: Dict[str, int] = {}
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.failures = 0                     # device callbacks that raised
        self.last_failure: Optional[str] = None   # the traceback of the latest one

    def schedule(self, key: str, when_ns: Optional[int], fn: Callable[[], None]) -> None:
        """Call ``fn`` on the timer thread at monotonic time ``when_ns`` (nanoseconds), replacing
        the pending event of ``key``; ``when_ns`` None cancels it. Starts the thread on first use;
        does nothing once the scheduler is closed."""
        with self._cond:
            if self._closed:
                return
            if when_ns is None:
                self._live.pop(key, None)
                return
            n = next(self._seq)
            self._live[key] = n
            heapq.heappush(self._heap, (when_ns, n, key, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="pykvm-device-timers",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    while self._heap and self._live.get(self._heap[0][2]) != self._heap[0][1]:
                        heapq.heappop(self._heap)            # superseded
                    if self._heap:
                        wait = (self._heap[0][0] - self.clock()) / 1e9
                        if wait <= 0:
                            break
                        self._cond.wait(min(wait, 1.0))
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _, n, key, fn = heapq.heappop(self._heap)
                self._live.pop(key, None)
            try:
                fn()
            except Exception as e:  # noqa: BLE001 — a device callback must not kill the timer
                self.failures += 1    # thread, but its failure stays visible (pykvm's own bug)
                import traceback          # only on a failure: it costs ~5 ms to import
                self.last_failure = "".join(traceback.format_exception(type(e), e,
                                                                       e.__traceback__))

    def close(self) -> None:
        """Stop the timer thread: pending events are dropped and later :meth:`schedule` calls
        ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
