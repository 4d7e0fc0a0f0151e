"""The host thread of the thread-served virtio devices (pykvm/devices/virtio/hostthread.py): a
round that raises, in its poll set or its work, does not leave a device that stops in silence; it
sets DEVICE_NEEDS_RESET and says why, and the driver's reset and next DRIVER_OK start the thread
again; close() racing a dying thread leaves no thread."""
import threading
import time

import pytest

from pykvm.devices.virtio import DeviceHandles
from pykvm.devices.virtio.hostthread import HostThreadDevice
from pykvm.testing import wait_until


class Faulty(HostThreadDevice):
    """Raises in its poll set or its round while told to; counts its rounds."""
    device_id = 4
    num_queues = 1
    thread_name = "faulty"

    def __init__(self, fail_poll=False, fail_pump=False):
        super().__init__()
        self.fail_poll, self.fail_pump, self.rounds = fail_poll, fail_pump, 0

    def _poll_set(self):
        if self.fail_poll:
            raise RuntimeError("poll set failed")
        return {}, None

    def _pump(self, ready, woken):
        if self.fail_pump:
            raise OSError(24, "Too many open files")
        self.rounds += 1


@pytest.mark.parametrize("where,said", [
    ("poll", "RuntimeError: poll set failed"),
    ("pump", "OSError: [Errno 24] Too many open files"),
])
def test_a_fault_needs_reset_and_a_reset_starts_the_thread_again(where, said):
    dev = Faulty(fail_poll=where == "poll", fail_pump=where == "pump")
    resets = threading.Event()
    handles = DeviceHandles(lambda *a: None, resets.set)
    try:
        dev.activate(0, [None], handles)
        wait_until(resets.is_set, "DEVICE_NEEDS_RESET from the thread that raised")
        assert dev.thread_error == f"faulty thread stopped: {said}"
        wait_until(lambda: dev._thread is None, "the thread to be gone")
        dev.fail_poll = dev.fail_pump = False
        dev.reset()
        dev.activate(0, [None], handles)                  # the driver starts it again
        assert dev.thread_error is None
        wait_until(lambda: dev.rounds >= 1, "a round of the new thread")
    finally:
        dev.close()
    assert dev.closed


def test_close_racing_a_dying_thread_leaves_no_thread():
    h = DeviceHandles(lambda *a: None, lambda: None)
    for k in range(50):
        dev = Faulty(fail_pump=True)
        dev.activate(0, [None], h)
        if k % 2:
            time.sleep(0.0005 * (k % 7))
        thread = dev._thread
        dev.close()
        if thread is not None:
            thread.join(10)
            assert not thread.is_alive()
        dev.activate(0, [None], h)                       # never started after close
        assert dev._thread is None or not dev._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "faulty"]
