"""What a lab shows while it works: log lines, byte meters (downloads, unpacking) and QEMU's live line.

Two renderings (chosen when a bar or live line starts):

* on a terminal (stderr is a TTY and ``TERM`` is not ``dumb``): tqdm bars with bytes and rate, and one
  status line redrawn in place while QEMU runs;
* anywhere else (a pipe, a CI log): plain lines only — one per stage, a byte meter at most every
  ``PLAIN_EVERY`` seconds plus a summary line, QEMU's status when its stage changes and otherwise at
  most every ``PLAIN_EVERY`` seconds.

``PYKVM_LAB_PROGRESS=tty`` or ``plain`` overrides the choice.  Everything is written to stderr by the
thread that calls in (the labs call from their main thread only, so nothing is drawn behind the back
of the interrupt handling in :mod:`pykvm.lab.proc`).  After :func:`silence` nothing more is written:
an interrupted lab prints exactly one closing line of its own.
"""

from __future__ import annotations

import os
import sys
import time

PLAIN_EVERY = 10.0  # seconds between plain progress lines of one meter or boot
TTY_REFRESH = 0.2  # seconds between redraws of the live line

_stage = "starting"
_silenced = False
_bars: list = []  # live tqdm instances (terminal mode)


def fancy() -> bool:
    """True when progress is drawn as bars and a live line (a terminal), False for plain lines."""
    forced = os.environ.get("PYKVM_LAB_PROGRESS", "").lower()
    if forced in ("tty", "bar", "bars"):
        return _tqdm() is not None
    if forced == "plain":
        return False
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and os.environ.get("TERM", "") != "dumb" and _tqdm() is not None


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:  # an optional nicety: plain lines do without it
        return None
    tqdm.monitor_interval = 0  # no monitor thread: children are forked while bars exist
    return tqdm


def _width_args() -> dict:
    """tqdm's size arguments: follow the terminal, or 80x24 where it reports none (a bare pty)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def _write(line: str) -> None:
    if _silenced:
        return
    if _bars:
        _tqdm().write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def log(msg: str) -> None:
    """One line on stderr, ``[lab] msg`` (above any bar that is being drawn)."""
    _write(f"[lab] {msg}")


def stage(what: str) -> None:
    """Name what the lab is doing now (the interrupt message says where it stopped)."""
    global _stage
    _stage = what


def current_stage() -> str:
    return _stage


def silence(clear: bool = True) -> None:
    """Write nothing more; with ``clear``, also take any bar off the screen (not from inside a signal
    handler, which may have interrupted a bar in the middle of drawing: it only sets the flag)."""
    global _silenced
    _silenced = True
    if not clear:
        return
    for bar in list(_bars):
        try:
            bar.leave = False
            bar.close()
        except Exception:  # noqa: BLE001 — a half-drawn bar must not stop the lab from ending
            pass
    _bars.clear()


def silenced() -> bool:
    return _silenced


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Meter:
    """Byte progress of one download or unpack: ``update(n)`` as bytes go by, ``close()`` at the end.

    ``label`` names the item (``linux-modules-7.2.13-riscv64 7.2.13-1``), ``verb`` the action
    (``downloading``), ``total`` the expected bytes (0 = unknown).  A summary line (bytes, seconds,
    rate) is logged when the meter closes without an error; ``quiet_below`` seconds: below that a
    plain-mode meter leaves no line at all (small unpacks need none)."""

    def __init__(self, label: str, total: int = 0, verb: str = "downloading", done: str = "downloaded",
                 quiet_below: float = 0.0):
        self.label, self.total, self.verb, self.done = label, max(0, int(total)), verb, done
        self.quiet_below = quiet_below
        self.n = 0
        self.t0 = time.monotonic()
        self._last_plain = self.t0
        self._bar = None
        self._closed = False
        self._outer_stage = _stage
        stage(f"{verb} {label}")
        tqdm = _tqdm() if fancy() and not _silenced else None
        if tqdm is not None:
            self._bar = tqdm(total=self.total or None, desc=f"{verb} {label}", unit="B", unit_scale=True,
                             file=sys.stderr, leave=False, mininterval=TTY_REFRESH, miniters=1, **_width_args())
            _bars.append(self._bar)

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def set_total(self, total: int) -> None:
        self.total = max(0, int(total))
        if self._bar is not None:
            self._bar.total = self.total or None
            self._bar.refresh()

    def update(self, n: int) -> None:
        self.n += n
        if _silenced:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_EVERY:
            self._last_plain = now
            rate = self.n / max(now - self.t0, 1e-6)
            of = f" of {_mb(self.total)} ({100 * self.n / self.total:.0f}%)" if self.total else ""
            _write(f"[lab]   {self.verb} {self.label}: {_mb(self.n)}{of}, {rate / 1e6:.1f} MB/s")

    def close(self, ok: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        stage(self._outer_stage)
        if self._bar is not None:
            if self._bar in _bars:
                _bars.remove(self._bar)
            self._bar.close()
        secs = time.monotonic() - self.t0
        if ok and secs >= self.quiet_below:
            log(f"{self.done} {self.label}: {_mb(self.n)} in {secs:.1f} s ({self.n / max(secs, 1e-6) / 1e6:.1f} MB/s)")


class LiveLine:
    """A status line for a long step (a QEMU boot): ``show(stage, detail)`` as often as you like.

    Terminal: one line redrawn in place, ``<name> <elapsed> <stage> <detail>``, cut to the width.
    Plain: a line when ``stage`` changes, else at most every ``PLAIN_EVERY`` seconds when ``detail``
    changed.  ``echo(line)`` prints a line above it (the serial log in ``--verbose``)."""

    def __init__(self, name: str, draw: bool = True):
        self.name = name
        self.t0 = time.monotonic()
        self._stage: str | None = None
        self._detail = ""
        self._printed_detail = ""
        self._last_plain = 0.0
        self._last_draw = 0.0
        self._bar = None
        tqdm = _tqdm() if draw and fancy() and not _silenced else None
        if tqdm is not None:
            self._bar = tqdm(total=None, bar_format="{desc}", file=sys.stderr, leave=False, **_width_args())
            _bars.append(self._bar)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def show(self, stage_: str, detail: str = "", plain_detail: str | None = None) -> None:
        """``detail`` goes on the terminal line; ``plain_detail`` (default: ``detail``) on plain lines."""
        if _silenced:
            return
        now = time.monotonic()
        secs = now - self.t0
        if self._bar is not None:
            changed = (stage_, detail) != (self._stage, self._detail)
            since = now - self._last_draw
            # a new stage at once; a new detail at most every TTY_REFRESH; the clock once a second
            if stage_ != self._stage or (changed and since >= TTY_REFRESH) or since >= 1.0:
                self._stage, self._detail, self._last_draw = stage_, detail, now
                text = f"{self.name} {secs:4.0f} s  {stage_}" + (f"  {detail}" if detail else "")
                self._bar.set_description_str(text, refresh=True)
            return
        pd = detail if plain_detail is None else plain_detail
        if stage_ != self._stage:
            self._stage, self._printed_detail, self._last_plain = stage_, pd, now
            log(f"{self.name}: {stage_}" + (f" — {pd}" if pd else "") + f" ({secs:.0f} s)")
        elif pd != self._printed_detail and now - self._last_plain >= PLAIN_EVERY:
            self._printed_detail, self._last_plain = pd, now
            log(f"{self.name}: {stage_}" + (f" — {pd}" if pd else "") + f" ({secs:.0f} s)")

    def echo(self, line: str) -> None:
        _write(line)

    def close(self) -> None:
        if self._bar is not None:
            if self._bar in _bars:
                _bars.remove(self._bar)
            self._bar.close()
            self._bar = None
