"""Exit statuses of ``pykvm run`` (and of :attr:`pykvm.machine.RunResult.exit_code`).

Every odd status belongs to the guest: a write of V to QEMU's isa-debug-exit device
(``-device isa-debug-exit,iobase=0xf4,iosize=4``, ports 0xf4–0xf7) ends the run with
``(V << 1) | 1`` (mod 256), exactly as under QEMU, so a test kernel's verdict reads the same under
both. pykvm's own outcomes use even statuses:

======  ===============================================================================
status  meaning
======  ===============================================================================
0       the guest finished: a DONE report, HLT with nothing left to run, a power-off
odd     isa-debug-exit: ``(V << 1) | 1`` for a write of V
2       bad input: a bad option (including one the machine cannot honour, e.g. more vCPUs
        than its tables describe; the line names the limit), or an image that is
        missing, unreadable or malformed
4       guest failure: a failed GUEST_ASSERT, an unexpected exception/trap, a triple
        fault, a report pykvm cannot accept (e.g. outside guest RAM), or a request the
        VMM cannot serve because of guest-provided values (a buffer outside RAM)
6       unhandled exit: the guest did something no device or handler serves
        (an unknown port, MMIO outside RAM, KVM_EXIT_INTERNAL_ERROR, FAIL_ENTRY ...)
8       VMM error: a host-side failure, never the guest's doing: a KVM ioctl failed, a host
        limit was reached (file descriptors, memory, threads; the line names it), the
        host could not back guest RAM, output could not be written (stdout closed or
        full, a report file), or pykvm's own code failed (an exit handler raised)
10      ``pykvm bench`` only: a ratio stayed over its limit when measured again (the
        line names each, with its value and limit)
124     timeout: the deadline (``--timeout``) passed first
130     interrupted by SIGINT (Ctrl-C), or stopped at an interactive console by Ctrl-A x
141     the reader of stdout went away (SIGPIPE)
143     terminated by SIGTERM
129,    ended by SIGHUP (the terminal went away), SIGQUIT, SIGUSR1 or SIGUSR2: 128 + the
131,    signal's number, one line and the terminal restored, as for SIGTERM
138,
140
======  ===============================================================================

130 and 124 follow the shell and coreutils' ``timeout``; 141 and 143 (128 + signal number) are
odd and so overlap with isa-debug-exit values 70 and 71, which a guest should not use.
"""

OK = 0
BAD_INPUT = 2
GUEST_FAILURE = 4
UNHANDLED_EXIT = 6
VMM_ERROR = 8
OVER_LIMIT = 10
TIMEOUT = 124
SIGINT = 130
SIGPIPE = 141


def debug_exit_status(value: int) -> int:
    """QEMU's isa-debug-exit convention: a write of ``value`` exits with ``(value << 1) | 1``,
    truncated to 8 bits as a process status is."""
    return ((value << 1) | 1) & 0xFF
