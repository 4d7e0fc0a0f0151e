"""Issue 19: ``pykvm run`` with a console that takes input, driven as a person would drive it:
under a pseudo-terminal (pexpect), with serial_echo.c (beside this file) echoing what it
receives in upper case. Typed keys reach the guest, its echo comes back while it runs, Ctrl-C
goes to the guest (raw mode), ``Ctrl-A h`` prints the help line, ``Ctrl-A Ctrl-A`` sends one
Ctrl-A, ``Ctrl-A x`` stops the run with status 130 (as a stop by the user, pykvm.status), and
the terminal's settings are the same after the run as before it on every way out (Ctrl-A x, the
guest's own end, SIGTERM). Without a terminal, standard input feeds the guest until its end."""
import os
import signal
import subprocess
import sys
import termios

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY = "serial_echo: ready"


@pytest.fixture
def echo_image(guest_image):
    return guest_image("serial_echo.c")


def _spawn(image, *extra, raw=True):
    """``pykvm run`` under a fresh pty, started only once the test has read the terminal's
    settings: the shell waits for one line, then execs pykvm (same pid)."""
    cmd = (f'read go; exec "{sys.executable}" -m pykvm run --machine pc --timeout 60 '
           + " ".join(extra) + f' "{image}"')
    child = pexpect.spawn("/bin/sh", ["-c", cmd], cwd=ROOT, timeout=30, echo=False)
    before = termios.tcgetattr(child.child_fd)
    child.sendline("go")
    child.expect_exact(READY)
    assert (termios.tcgetattr(child.child_fd) != before) == raw     # raw mode while it runs
    return child, before


def _finish(child, before):
    child.expect(pexpect.EOF)
    after = termios.tcgetattr(child.child_fd)
    child.close()
    assert after == before, (before, after)
    return child


def test_typing_help_literal_ctrl_a_and_quit(echo_image):
    child, before = _spawn(echo_image)
    child.send("hello")
    child.expect_exact("HELLO")                 # echoed while the guest runs on
    child.send("\x03")                          # Ctrl-C: a key for the guest, not a signal
    child.expect_exact("^C")
    child.send("\x01h")
    child.expect_exact("Ctrl-A x quits")
    child.send("\x01\x01z")
    child.expect_exact("^AZ")                   # one Ctrl-A reached the guest
    child.send("\x01qk")                        # an unknown command key is dropped
    child.expect_exact("K")
    child.send("\x01x")
    child.expect_exact("stopped at the console (Ctrl-A x)")
    _finish(child, before)
    assert child.exitstatus == 130
    assert "Q" not in child.before.decode(errors="replace")


def test_the_guest_ending_by_itself_restores_the_terminal(echo_image):
    child, before = _spawn(echo_image)
    child.send("bye\x04")                       # Ctrl-D: serial_echo's end of input
    child.expect_exact("BYE")
    _finish(child, before)
    assert child.exitstatus == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129),
                                       (signal.SIGQUIT, 131), (signal.SIGUSR1, 138)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1"])
def test_a_signal_restores_the_terminal(echo_image, sig, code):
    child, before = _spawn(echo_image)
    child.send("x")
    child.expect_exact("X")
    os.kill(child.pid, sig)                     # kill(1): the keys no longer send signals
    child.expect_exact(f"interrupted by {sig.name}")
    _finish(child, before)
    assert child.exitstatus == code


def test_no_input_leaves_the_terminal_alone(echo_image):
    child, before = _spawn(echo_image, "--no-input", "--timeout", "1", raw=False)
    child.expect_exact("did not finish")
    _finish(child, before)
    assert child.exitstatus == 124


def test_piped_input_feeds_the_guest_until_its_end(echo_image):
    data = b"piped line one\nline two\x04"
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--machine", "pc", echo_image],
                       input=data, capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(b"PIPED LINE ONE\nLINE TWO"), r.stdout


def test_piped_input_that_ends_early_leaves_the_guest_waiting(echo_image):
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--machine", "pc", "--timeout",
                        "1", echo_image], input=b"abc", capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 124 and r.stdout.endswith(b"ABC"), (r.stdout, r.stderr)
