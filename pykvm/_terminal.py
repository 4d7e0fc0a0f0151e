"""The host side of an interactive console (``pykvm run``): a terminal in raw mode that is
always put back, QEMU's ``Ctrl-A`` escapes, and a thread that carries standard input to the
guest's console and the guest's output to the screen while the guest runs.

* :class:`RawTerminal` puts a terminal in raw mode the way QEMU's stdio character device does
  (no echo, no line editing, no signal keys — Ctrl-C and Ctrl-Z go to the guest —, 8-bit bytes,
  output post-processing kept) and restores the saved settings on every way out: leaving the
  ``with`` block (a normal end, an exception, a signal that ended the run) and, as a backstop,
  interpreter exit (``atexit``). Restoring is idempotent and never raises.
* :class:`EscapeParser` splits keystrokes into data for the guest and QEMU's mux commands:
  ``Ctrl-A x`` quits, ``Ctrl-A h`` (or ``?``) prints :data:`HELP`, ``Ctrl-A Ctrl-A`` sends one
  Ctrl-A; any other key after Ctrl-A is dropped, as QEMU drops it.
* :class:`ConsolePump` is the thread: it reads the input file descriptor (or none), hands its
  bytes to ``feed`` — any callable that takes bytes and returns how many it accepted, e.g.
  :meth:`pykvm.machine.Machine.send_console` for the serial console or a virtio console's
  ``feed`` — waiting while ``feed`` takes nothing, and calls ``flush`` (the machine's
  :meth:`~pykvm.machine.Machine.flush_console`) every ``interval`` seconds so output shows up
  while the guest sits in HLT waiting for a key.
"""
from __future__ import annotations

import atexit
import os
import select
import signal
import termios
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, List, Optional, Union

ESCAPE = 0x01                  # Ctrl-A, QEMU's default mux escape
QUIT = "quit"
HELP_CMD = "help"
HELP = ("pykvm console: Ctrl-A x quits (status 130, as for Ctrl-C), Ctrl-A h prints this "
        "help, Ctrl-A Ctrl-A sends Ctrl-A")


class EscapeParser:
    """QEMU's escape handling over a stream of keystrokes, one chunk at a time (an escape may
    be split across chunks)."""

    def __init__(self) -> None:
        self.escaped = False           # the last chunk ended in Ctrl-A

    def parse(self, data: bytes) -> List[Union[bytes, str]]:
        """The chunk ``data`` as a list, in order, of byte strings for the guest and commands
        (:data:`QUIT`, :data:`HELP_CMD`)."""
        out: List[Union[bytes, str]] = []
        run = bytearray()
        for c in data:
            if self.escaped:
                self.escaped = False
                if c == ESCAPE:
                    run.append(c)
                    continue
                cmd = {ord("x"): QUIT, ord("h"): HELP_CMD, ord("?"): HELP_CMD}.get(c)
                if cmd is not None:
                    if run:
                        out.append(bytes(run))
                        run.clear()
                    out.append(cmd)
            elif c == ESCAPE:
                self.escaped = True
            else:
                run.append(c)
        if run:
            out.append(bytes(run))
        return out


class RawTerminal:
    """Raw mode on the terminal ``fd`` for the ``with`` block (nothing happens when ``fd`` is
    not a terminal: :attr:`active` stays False). See the module docstring."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: Optional[list] = None

    @property
    def active(self) -> bool:
        """True while the terminal is in raw mode by this object's doing."""
        return self.saved is not None

    def __enter__(self) -> RawTerminal:
        try:
            if not os.isatty(self.fd):
                return self
            saved = termios.tcgetattr(self.fd)
        except (OSError, termios.error):
            return self                 # a closed or odd fd: no terminal to change
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = saved
        # QEMU's qemu_chr_set_echo_stdio() and stdio signal=off
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP |
                   termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
        oflag |= termios.OPOST
        cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN |
                   termios.ISIG)
        cc = list(cc)
        cc[termios.VMIN] = 1
        cc[termios.VTIME] = 0
        raw = [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]
        self.saved = saved
        atexit.register(self.restore)
        try:
            self._set(raw)
        except (OSError, termios.error):
            self.restore()
        return self

    def _set(self, attrs: list) -> None:
        # from a background process group tcsetattr would stop us with SIGTTOU: block it
        # (POSIX: a blocked SIGTTOU lets the change through)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, attrs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def restore(self) -> None:
        """Put the saved settings back (once; later calls do nothing; never raises)."""
        saved, self.saved = self.saved, None
        if saved is None:
            return
        atexit.unregister(self.restore)
        try:
            self._set(saved)
        except (OSError, termios.error):
            pass                        # the terminal went away (hang-up): nothing to restore

    def __exit__(self, *exc) -> None:
        self.restore()


class ConsolePump:
    """A daemon thread that carries console input and output while a guest runs.

    ``fd``: the file descriptor to read input from (None: no input). ``feed(bytes) -> int``:
    takes input for the guest, returns the bytes it accepted (what it does not take is offered
    again, in order, after a short wait; nothing read is dropped). ``escapes``: read ``fd`` as
    keystrokes with :class:`EscapeParser` (a terminal); otherwise its bytes go to the guest as
    they are, and its end (EOF, or a read error) just stops the input. ``on_quit()``: called
    (from the thread) at Ctrl-A x. ``say(text)``: where the help line goes (default: standard
    error, with CR-LF as a raw terminal needs). ``flush()``: called every ``interval`` seconds
    (e.g. :meth:`pykvm.machine.Machine.flush_console`). An exception from ``feed`` or
    ``flush`` (the machine closed) ends the thread quietly; :attr:`error` keeps it."""

    READ_AHEAD = 1 << 16          # bytes read but not yet taken by feed, at most

    def __init__(self, fd: Optional[int], feed: Callable[[bytes], int], *,
                 escapes: bool = False, on_quit: Optional[Callable[[], None]] = None,
                 flush: Optional[Callable[[], None]] = None,
                 say: Optional[Callable[[str], None]] = None, interval: float = 0.02) -> None:
        self.fd = fd
        self.feed = feed
        self.parser = EscapeParser() if escapes else None
        self.on_quit = on_quit
        self.flush = flush
        self.say = say or _say_stderr
        self.interval = interval
        self.quit = False                  # Ctrl-A x was typed
        self.eof = fd is None              # no more input will come
        self.error: Optional[BaseException] = None
        self._pending = bytearray()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    def start(self) -> ConsolePump:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """End the thread and wait for it (``timeout`` seconds at most); idempotent."""
        if not self._stopping:
            self._stopping = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> ConsolePump:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping and not self.quit:
                if self._pending:
                    n = self.feed(bytes(self._pending))
                    del self._pending[:n]
                read = not self.eof and len(self._pending) < self.READ_AHEAD
                wait = 0.002 if self._pending else self.interval
                fds = [self._wake_r] + ([self.fd] if read and self.fd is not None else [])
                try:
                    ready, _, _ = select.select(fds, [], [], wait)
                except (OSError, ValueError):
                    if len(fds) == 1:
                        raise
                    self.eof = True             # the input fd is closed or bad: no input
                    continue
                if self.flush is not None:
                    self.flush()
                if self.fd is not None and self.fd in ready:
                    self._read()
        except Exception as e:  # noqa: BLE001 — the machine closed under us: stop quietly
            self.error = e

    def _read(self) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""                      # a hung-up terminal or a bad fd: no more input
        if not data:
            self.eof = True
            return
        if self.parser is None:
            self._pending += data
            return
        for item in self.parser.parse(data):
            if isinstance(item, bytes):
                self._pending += item
            elif item == HELP_CMD:
                self.say(HELP)
            elif item == QUIT:
                self.quit = True
                if self.on_quit is not None:
                    self.on_quit()
                return


def _say_stderr(text: str) -> None:
    try:
        os.write(2, ("\r\n" + text + "\r\n").encode())
    except OSError:
        pass
