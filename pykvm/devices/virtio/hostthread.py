"""The skeleton of a virtio device served by one host thread (:mod:`.net`, :mod:`.vsock`).

The thread is started at the first DRIVER_OK and stopped by :meth:`HostThreadDevice.close`. It
polls an eventfd that the driver's notifications write (the *kick*) together with the file
descriptors the subclass names (:meth:`~HostThreadDevice._poll_set`, asked under the device's
lock), and after every wake-up calls :meth:`~HostThreadDevice._pump`, which does the queue work
under that lock and raises the interrupts after letting it go (the transport's lock, which a
vCPU may hold while it waits for ours, is taken by an interrupt).

A round that raises (a fault of pykvm's own, or of the host such as running out of file
descriptors; what the guest does wrong is handled in the round) does not end the device in
silence: it sets DEVICE_NEEDS_RESET and :attr:`HostThreadDevice.thread_error`, which
``Machine.device_errors()`` reports.

A subclass sets :attr:`~.VirtioDevice.device_id`, :attr:`~.VirtioDevice.num_queues`,
:attr:`thread_name` and :attr:`wake_queues`, calls ``super().__init__()`` first, and overrides
:meth:`~HostThreadDevice._poll_set` and :meth:`~HostThreadDevice._pump`; the hooks
:meth:`~HostThreadDevice._activated`, :meth:`~HostThreadDevice._reset_locked` and
:meth:`~HostThreadDevice._release` add its own state to activate, reset and close.
"""
from __future__ import annotations

import os
import select
import threading

from . import INT_VRING, DeviceHandles, VirtioDevice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple

JOIN_TIMEOUT = 10.0         # seconds close() waits for the thread


class HostThreadDevice(VirtioDevice):
    """A :class:`VirtioDevice` whose queue work runs on one host thread (module docstring).

    State shared with the thread, guarded by ``_lock`` (a :class:`threading.Lock`): ``_queues``
    (a list of ``num_queues`` :class:`.queue.Virtqueue` or None), ``_handles``
    (:class:`DeviceHandles` or None while the device is not running) and ``_broken`` (a chain
    broke the ring rules: no more queue work until the next activate or reset). ``_evfd`` is
    the kick eventfd (-1 once closed). Creating one raises :class:`OSError` if no eventfd can
    be made (out of file descriptors)."""

    thread_name = "virtio"
    wake_queues: Tuple[int, ...] = ()       # queue indexes whose notification wakes the thread
    thread_error: Optional[str] = None      # why the thread stopped serving (module docstring)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: List[Optional[Any]] = [None] * self.num_queues
        self._handles: Optional[DeviceHandles] = None
        self._broken = False
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._closed = False
        self._evfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # ---- lifecycle -------------------------------------------------------------------

    def activate(self, features: int, queues: Sequence[Optional[Any]],
                 handles: DeviceHandles) -> None:
        """Take the queues (index ``i`` from ``queues[i]``, None past its end) and the
        handles, run :meth:`_activated` under the lock, start the thread (once, never after
        :meth:`close`) and wake it."""
        with self._lock:
            self._queues = [queues[i] if i < len(queues) else None
                            for i in range(self.num_queues)]
            self._handles = handles
            self._broken = False
            self._activated(features)
            start = self._thread is None and not self._closed
            if start:
                self.thread_error = None
                self._thread = threading.Thread(target=self._run, name=self.thread_name,
                                                daemon=True)
        if start:
            assert self._thread is not None
            self._thread.start()
        self._kick()

    def reset(self) -> None:
        """Drop the queues and the handles, run :meth:`_reset_locked` under the lock and wake
        the thread (so that it sees the reset)."""
        with self._lock:
            self._queues = [None] * self.num_queues
            self._handles = None
            self._broken = False
            self._reset_locked()
        self._kick()

    def close(self) -> None:
        """Reset, stop the thread (waiting up to :data:`JOIN_TIMEOUT` seconds unless called
        from it), :meth:`_release` the subclass's host resources and close the eventfd.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.reset()
        self._stopping = True
        self._kick()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=JOIN_TIMEOUT)
        self._release()
        fd, self._evfd = self._evfd, -1
        if fd >= 0:
            os.close(fd)

    def _activated(self, features: int) -> None:
        """Hook, under the lock, at :meth:`activate`: ``features`` are the negotiated bits."""

    def _reset_locked(self) -> None:
        """Hook, under the lock, at :meth:`reset` (and so at :meth:`close`)."""

    def _release(self) -> None:
        """Hook at :meth:`close`, after the thread stopped: close the subclass's host
        resources. Must not raise."""

    # ---- notifications ---------------------------------------------------------------

    def notify(self, index: int) -> None:
        """A queue in :attr:`wake_queues` was notified: wake the thread; others are ignored."""
        if index in self.wake_queues:
            self._kick()

    def _kick(self) -> None:
        """Wake the thread (a no-op once closed; never raises)."""
        fd = self._evfd
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    # ---- the thread ------------------------------------------------------------------

    def _poll_set(self) -> Tuple[Dict[int, int], Optional[int]]:
        """Called under the lock before each wait: ``{fd: poll events}`` to wait for besides
        the kick, and the timeout in milliseconds (None: none)."""
        return {}, None

    def _pump(self, ready: Dict[int, int], woken: bool) -> None:
        """One round of work after a wake-up: ``ready`` maps the fds of :meth:`_poll_set`
        that became ready to their poll events; ``woken``: the kick fired. Takes the lock
        itself and must not raise for anything the guest or a host peer did."""

    def _signal(self, h: Optional[DeviceHandles], failed: bool, irq: List[int]) -> None:
        """After a round, outside the lock: with handles ``h`` (those taken under the lock;
        None: nothing), set DEVICE_NEEDS_RESET if ``failed`` and raise a vring interrupt for
        each queue index in ``irq``."""
        if h is None:
            return
        if failed:
            h.needs_reset()
        for q in irq:
            h.interrupt(INT_VRING, q)

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001 — pykvm's own fault; the guest's are handled in _pump
            self._died(e)

    def _serve(self) -> None:
        ev = self._evfd
        while not self._stopping:
            with self._lock:
                fds, timeout = self._poll_set()
            poller = select.poll()
            poller.register(ev, select.POLLIN)
            for fd, mask in fds.items():
                poller.register(fd, mask)
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                continue
            ready: Dict[int, int] = {}
            woken = False
            for fd, got in events:
                if fd == ev:
                    woken = True
                    try:
                        os.eventfd_read(ev)
                    except OSError:
                        pass
                else:
                    ready[fd] = got
            if self._stopping:
                break
            self._pump(ready, woken)

    def _died(self, e: Exception) -> None:
        """The thread's round raised (a fault of pykvm's, or of the host: out of file
        descriptors): rather than a device that silently stops, it stops serving with
        DEVICE_NEEDS_RESET (virtio 1.2 section 2.1.2) and :attr:`thread_error` saying why
        (``Machine.device_errors()``); the driver's reset and next DRIVER_OK start a thread
        again."""
        with self._lock:
            self.thread_error = f"{self.thread_name} thread stopped: {type(e).__name__}: {e}"
            self._broken = True
            self._thread = None
            h = self._handles
        if h is not None:
            h.needs_reset()


__all__ = ["HostThreadDevice", "JOIN_TIMEOUT"]
