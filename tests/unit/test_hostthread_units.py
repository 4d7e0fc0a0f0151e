"""The host thread of the thread-served virtio devices (pykvm/devices/virtio/hostthread.py): a
round that raises does not leave a device that stops in silence; it sets DEVICE_NEEDS_RESET and
says why, and the driver's reset and next DRIVER_OK start the thread again."""
import threading

from pykvm.devices.virtio import DeviceHandles
from pykvm.devices.virtio.hostthread import HostThreadDevice
from pykvm.testing import wait_until


class Flaky(HostThreadDevice):
    """Its first round raises; the later ones count themselves."""
    device_id = 4
    num_queues = 1
    thread_name = "flaky"

    def __init__(self):
        super().__init__()
        self.rounds = 0
        self.raised = False

    def _poll_set(self):
        return {}, None

    def _pump(self, ready, woken):
        if not self.raised:
            self.raised = True
            raise OSError(24, "Too many open files")
        self.rounds += 1


def test_a_round_that_raises_needs_reset_and_a_reset_starts_the_thread_again():
    dev = Flaky()
    resets = threading.Event()
    handles = DeviceHandles(lambda *a: None, resets.set)
    try:
        dev.activate(0, [None], handles)
        wait_until(resets.is_set, "DEVICE_NEEDS_RESET from the thread that raised")
        assert dev.thread_error == "flaky thread stopped: OSError: [Errno 24] Too many open files"
        wait_until(lambda: dev._thread is None, "the thread to be gone")
        dev.reset()
        dev.activate(0, [None], handles)                  # the driver starts it again
        assert dev.thread_error is None
        wait_until(lambda: dev.rounds >= 1, "a round of the new thread")
    finally:
        dev.close()
    assert dev.closed
