"""Run-loop helpers for hardware tests that build loops themselves.

A :class:`~pykvm.runloop.LoopConfig` serves no ports by default (the platform names them); a
test that runs a loop on an x86 guest of its own passes the PC's: COM1's 16550 at 0x3F8, the
debug console at 0xE9 and QEMU's isa-debug-exit at 0xF4-0xF7 (``iobase=0xf4,iosize=4``).
"""
from pykvm.runloop import LoopConfig, RunLoop
from pykvm.testing.reference_loop import ReferenceLoop

PC_PORTS = {"serial_base": 0x3F8, "debugcon_port": 0xE9, "exit_port": 0xF4, "exit_port_size": 4}

# both loops, for @pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
LOOPS = (RunLoop, ReferenceLoop)
LOOP_IDS = ("c-loop", "py-loop")


def pc_config(**kw) -> LoopConfig:
    """A LoopConfig serving the PC's ports, with ``kw`` on top."""
    return LoopConfig(**{**PC_PORTS, **kw})
