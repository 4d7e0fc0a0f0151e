"""pykvm._terminal: QEMU's Ctrl-A escapes, raw mode on a real pseudo-terminal and its
restoration, and the console thread that carries input to a ``feed`` that takes it at its own
pace (nothing lost or reordered, the end of input, Ctrl-A x, the help line, periodic flushes)."""
import os
import pty
import subprocess
import sys
import termios
import threading
import time

import pytest

from pykvm._terminal import ESCAPE, HELP, HELP_CMD, QUIT, ConsolePump, EscapeParser, RawTerminal


# -- escapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks, expect", [
    ([b"abc"], [b"abc"]),
    ([b"ab\x01xcd"], [b"ab", QUIT, b"cd"]),
    ([b"\x01h"], [HELP_CMD]),
    ([b"\x01?"], [HELP_CMD]),
    ([b"a\x01\x01b"], [b"a\x01b"]),                # Ctrl-A Ctrl-A: one Ctrl-A for the guest
    ([b"a\x01zb"], [b"ab"]),                        # an unknown command key is dropped
    ([b"a\x01", b"xb"], [b"a", QUIT, b"b"]),        # an escape split across reads
    ([b"\x01", b"\x01", b"\x01"], [b"\x01"]),       # ... and a literal one, then a pending one
])
def test_escape_parser(chunks, expect):
    p = EscapeParser()
    got = []
    for c in chunks:
        got += p.parse(c)
    assert got == expect


def test_escape_is_ctrl_a():
    assert ESCAPE == 0x01 and "Ctrl-A x" in HELP and "Ctrl-A h" in HELP


# -- raw mode ------------------------------------------------------------------------------------
@pytest.fixture
def a_pty():
    master, slave = pty.openpty()
    yield master, slave
    for fd in (master, slave):
        os.close(fd)


def test_raw_mode_on_a_pty_and_back(a_pty):
    _, slave = a_pty
    before = termios.tcgetattr(slave)
    with RawTerminal(slave) as t:
        assert t.active
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        assert not raw[0] & (termios.ICRNL | termios.IXON)
        assert raw[1] & termios.OPOST                  # output processing kept, as QEMU
        assert raw[2] & termios.CSIZE == termios.CS8
        assert raw[6][termios.VMIN] == 1 and raw[6][termios.VTIME] == 0
    assert not t.active
    assert termios.tcgetattr(slave) == before


def test_restore_is_idempotent_and_survives_an_exception(a_pty):
    _, slave = a_pty
    before = termios.tcgetattr(slave)
    t = RawTerminal(slave)
    with pytest.raises(RuntimeError):
        with t:
            raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before
    t.restore()
    t.restore()
    assert termios.tcgetattr(slave) == before


def test_restore_is_registered_with_atexit_while_raw(a_pty):
    # a child process leaves raw mode on without restoring: its interpreter's exit must. (Not
    # atexit._run_exitfuncs() here: that would run this test process's own exit functions,
    # weakref.finalize's among them, which stops every later finalizer.)
    _, slave = a_pty
    before = termios.tcgetattr(slave)
    code = ("import sys, termios; from pykvm._terminal import RawTerminal\n"
            "fd = int(sys.argv[1]); cooked = termios.tcgetattr(fd)\n"
            "t = RawTerminal(fd).__enter__()\n"
            "assert t.active and termios.tcgetattr(fd) != cooked\n")
    r = subprocess.run([sys.executable, "-c", code, str(slave)], pass_fds=(slave,),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert termios.tcgetattr(slave) == before


def test_not_a_terminal_is_left_alone():
    r, w = os.pipe()
    try:
        with RawTerminal(r) as t:
            assert not t.active
    finally:
        os.close(r)
        os.close(w)
    with RawTerminal(987654) as t:                     # not even an open fd
        assert not t.active


# -- the console thread --------------------------------------------------------------------------
class SlowSink:
    """A feed that takes at most ``per_call`` bytes a call and refuses every other call (a
    guest that reads slowly and a ring that fills)."""

    def __init__(self, per_call=3):
        self.got = bytearray()
        self.calls = 0
        self.per_call = per_call
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> int:
        with self.lock:
            self.calls += 1
            if self.calls % 2:
                return 0
            n = min(self.per_call, len(data))
            self.got += data[:n]
            return n


def _wait(cond, timeout=60.0):                     # a hang guard: returns when cond holds
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end
        time.sleep(0.005)


def test_pipe_input_reaches_a_slow_feed_whole_and_in_order():
    r, w = os.pipe()
    sink = SlowSink(per_call=97)
    data = bytes(i % 251 for i in range(20000))
    pump = ConsolePump(r, sink).start()
    try:
        for i in range(0, len(data), 1000):
            os.write(w, data[i:i + 1000])
        os.close(w)
        _wait(lambda: len(sink.got) == len(data))
        _wait(lambda: pump.eof)
        assert bytes(sink.got) == data                   # \x01 passed through: no escapes
    finally:
        pump.stop()
        os.close(r)


def test_terminal_input_escapes_quit_and_help(a_pty):
    master, slave = a_pty
    sink = SlowSink(per_call=1)
    said, quits = [], []
    pump = ConsolePump(slave, sink, escapes=True, on_quit=lambda: quits.append(1),
                       say=said.append).start()
    try:
        with RawTerminal(slave):
            os.write(master, b"ab\x01hc\x01\x01d")
            _wait(lambda: bytes(sink.got) == b"abc\x01d")
            assert said == [HELP]
            os.write(master, b"\x01xe")
            _wait(lambda: quits == [1])
            pump.stop()
            assert pump.quit and bytes(sink.got) == b"abc\x01d"   # nothing after the quit
    finally:
        pump.stop()


def test_a_quit_is_seen_while_the_feed_takes_nothing(a_pty):
    master, slave = a_pty
    quits = []
    pump = ConsolePump(slave, lambda data: 0, escapes=True,
                       on_quit=lambda: quits.append(1)).start()
    try:
        with RawTerminal(slave):
            os.write(master, b"typed ahead into a guest that never reads\x01x")
            _wait(lambda: quits == [1])
    finally:
        pump.stop()


def test_flush_runs_without_input_and_a_failing_feed_ends_the_thread():
    flushes = []
    pump = ConsolePump(None, lambda data: len(data), flush=lambda: flushes.append(1),
                       interval=0.005).start()
    _wait(lambda: len(flushes) >= 3)
    pump.stop()
    assert pump.error is None

    r, w = os.pipe()

    def closed(data):
        raise ValueError("machine closed")
    pump = ConsolePump(r, closed).start()
    os.write(w, b"x")
    _wait(lambda: pump.error is not None)
    assert isinstance(pump.error, ValueError)
    pump.stop()
    os.close(r)
    os.close(w)
