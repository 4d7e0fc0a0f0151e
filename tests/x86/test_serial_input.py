"""Issue 19: the 16550's host input path (``pykvm_uart_input`` in csrc/runloop.c,
:meth:`pykvm.runloop.UartGroup.feed`, :meth:`pykvm.machine.Machine.send_console`).

First the register view (no VM: the one C model through
:class:`~pykvm.devices.uart16550.Uart16550`): host bytes reach RBR with LSR.DR, one at a time
with the FIFOs off and up to 16 with them on, raise the received-data interrupt at the trigger
level (the character timeout below it), wait in the input ring while the receiver is full and
never overrun it, stay out of the receiver in loopback, and are refused (not dropped) when the
ring is full. Then serial_echo.c (beside this file) on the pc machine: an interrupt-driven echo
whose vCPU sleeps in HLT until input arrives, fed from another thread while it runs — more input
than the FIFO and than the ring hold, nothing lost or reordered, on both run loops."""
import random
import threading
import time

import pytest

from pykvm.devices.uart16550 import Uart16550
from pykvm.errors import Closed
from pykvm.machine import Machine
from pykvm.runloop import UartGroup

from _loops import LOOP_IDS, LOOPS

RBR, IER, IIR, LCR, MCR, LSR = 0, 1, 2, 3, 4, 5
EOT = 0x04


def _rbr_all(u, n):
    return bytes(u.read_register(RBR) for _ in range(n))


# -- the register view -------------------------------------------------------------------------
def test_fifos_off_each_byte_waits_for_the_previous_one_to_be_read():
    u = Uart16550()
    assert u.read_register(LSR) == 0x60                 # nothing received
    assert u.feed(b"abc") == 3
    assert u.group.input_waiting == 2                   # one in RBR, two in the ring
    assert u.read_register(LSR) == 0x61                 # DR, and no overrun: never from input
    got = []
    while u.read_register(LSR) & 1:
        got.append(u.read_register(RBR))
    assert bytes(got) == b"abc" and u.read_register(LSR) == 0x60
    assert u.group.input_delivered == 3 and u.group.input_waiting == 0


def test_fifo_fills_to_16_and_the_interrupt_follows_the_trigger_level():
    u = Uart16550()
    u.write_register(IIR, 0xC1)                         # FCR: FIFOs on, trigger level 14
    u.write_register(IER, 0x01)                         # received-data interrupt
    assert u.feed(b"0123456789") == 10
    assert u.read_register(IIR) == 0xCC                 # 10 < 14: character timeout
    data = bytes(range(0x41, 0x41 + 30))
    assert u.feed(data) == 30
    assert u.group.input_waiting == 40 - 16             # the FIFO holds 16, the ring the rest
    assert u.read_register(IIR) == 0xC4                 # at the trigger level: received data
    got = _rbr_all(u, 40)
    assert got == b"0123456789" + data                  # the ring refilled the FIFO, in order
    assert u.read_register(LSR) == 0x60 and u.read_register(IIR) == 0xC1
    assert u.read_register(RBR) == 0                    # an empty FIFO reads 0


def test_a_full_ring_refuses_input_and_loses_nothing():
    u = Uart16550()
    cap = UartGroup.IN_CAP
    blob = bytes(random.Random(19).randrange(256) for _ in range(3 * cap))
    taken = u.feed(blob)
    assert taken == cap                                 # the ring's size; RBR took one more
    assert u.feed(blob[taken:]) == 1                    # the one RBR made room for
    taken += 1
    assert u.feed(blob[taken:]) == 0                    # full: refused, not dropped
    got = bytearray()
    while len(got) < len(blob):
        assert u.read_register(LSR) & 0x03 == 0x01      # DR, never OE
        got.append(u.read_register(RBR))
        if taken < len(blob):
            taken += u.feed(blob[taken:taken + 7])      # the sender keeps the ring topped up
    assert bytes(got) == blob
    assert u.read_register(LSR) == 0x60


def test_loopback_keeps_host_input_out_of_the_receiver_until_it_ends():
    u = Uart16550()
    u.write_register(MCR, 0x10)                         # loopback
    assert u.feed(b"xy") == 2
    assert u.read_register(LSR) == 0x60                 # the receiver hears only THR
    u.write_register(RBR, ord("L"))
    assert u.read_register(RBR) == ord("L")
    u.write_register(MCR, 0x03)                         # loopback off: host input moves in
    assert u.read_register(LSR) == 0x61
    assert _rbr_all(u, 2) == b"xy"


def test_fcr_flush_drops_the_receiver_and_refills_it_from_the_ring():
    u = Uart16550()
    u.write_register(IIR, 0x01)                         # FIFOs on, trigger level 1
    assert u.feed(bytes(range(20))) == 20
    u.write_register(IIR, 0x03)                         # clear the receive FIFO: 16 bytes go
    assert _rbr_all(u, 4) == bytes(range(16, 20))       # the ring's bytes were still waiting
    assert u.read_register(LSR) == 0x60


def test_feed_takes_buffers_and_refuses_text():
    g = UartGroup()
    assert g.feed(bytearray(b"ab")) == 2
    assert g.feed(memoryview(b"cd")) == 2
    assert g.feed(b"") == 0
    with pytest.raises(TypeError):
        g.feed("text")


# -- a guest that echoes -----------------------------------------------------------------------
def _echo(data: bytes) -> bytes:
    out = bytearray()
    for c in data:
        if ord("a") <= c <= ord("z"):
            out.append(c - 32)
        elif c < 0x20 and c not in (0x0D, 0x0A, 0x09):
            out += bytes((ord("^"), c + 0x40))
        else:
            out.append(c)
    return bytes(out)


def _send_all(m, data: bytes, deadline: float) -> None:
    """Send everything, waiting while the ring is full (the guest has not read it yet)."""
    sent = 0
    while sent < len(data):
        n = m.send_console(data[sent:])
        sent += n
        if not n:
            assert time.monotonic() < deadline, f"the guest stopped reading at {sent} bytes"
            time.sleep(0.002)


def _wait_idle(m, irqs_at: int, idle_at: int, least: int, deadline: float) -> None:
    """Wait until serial_echo.c sleeps in its idle loop with every interrupt handled (its
    ``idle_at`` equals its ``irqs``, at least ``least``): input sent after this wakes it
    with a new interrupt, whatever the host's load."""
    while True:
        irqs = m.memory.read_u64(irqs_at)
        if irqs >= least and m.memory.read_u64(idle_at) == irqs:
            return
        assert time.monotonic() < deadline, f"the guest never went idle ({irqs} interrupts)"
        time.sleep(0.002)


def _wait_console(m, text: bytes, deadline: float) -> None:
    while text not in m.console:
        assert time.monotonic() < deadline, f"no {text!r} in {m.console[-200:]!r}"
        m.flush_console()
        time.sleep(0.005)


@pytest.mark.requires_kvm
@pytest.mark.requires_arch("x86_64")
@pytest.mark.parametrize("fcr", [0x00, 0xC7], ids=["fifo-off", "fifo-14"])
@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_guest_echoes_input_sent_while_it_runs(guest_vm, loop_cls, fcr):
    """A guest asleep in HLT wakes on input (IRQ 4 through the IOAPIC); a first line is echoed
    while the run goes on (flush_console shows it), then 10 KiB more than the FIFO and the
    ring hold, from another thread: every byte echoed once, in order, no overrun."""
    m = guest_vm("serial_echo.c", machine="pc", loop=loop_cls)
    m.set_params(fcr)
    irqs_at, idle_at = m.sync(stage=1)[:2]
    rng = random.Random(fcr)
    alphabet = bytes(range(0x20, 0x7F)) + b"\x01\x1b\r\n\t"
    bulk = bytes(rng.choice(alphabet) for _ in range(10 * 1024 if loop_cls.native else 2048))
    first = b"hello, serial\r"
    failure = []

    def sender():
        try:
            deadline = time.monotonic() + 60
            _send_all(m, first, deadline)
            _wait_console(m, _echo(first), deadline)     # echoed while the guest runs on
            _wait_idle(m, irqs_at, idle_at, 1, deadline)  # the line's handler has returned
            _send_all(m, bulk + bytes([EOT]), deadline)
        except BaseException as e:  # noqa: BLE001 — handed to the test's thread
            failure.append(e)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    received, total, overruns, irqs, batched = m.sync(stage=2, timeout=120)
    t.join(10)
    if failure:
        raise failure[0]
    data = first + bulk
    assert received == len(data) and total == sum(data)
    assert overruns == 0
    assert irqs >= 2                                    # woken for the first line and again
    if fcr:
        assert batched > 0                              # more than one byte per interrupt
    m.done()
    assert m.console.endswith(_echo(data)), m.console[-120:]
    assert m.console.count(_echo(first)) == 1


@pytest.mark.requires_kvm
@pytest.mark.requires_arch("x86_64")
def test_send_console_on_a_bare_machine_and_after_close():
    m = Machine("hello", machine="bare")
    assert m.send_console(b"x") == 1                    # COM1 takes it even if never read
    m.flush_console()
    m.close()
    with pytest.raises(Closed):
        m.send_console(b"x")
