"""A GDB remote-serial-protocol stub for pykvm machines (QEMU's ``-gdb``): gdb attaches over
TCP or a Unix socket, one thread per vCPU, all-stop.

The common code is :mod:`pykvm.gdbstub.server` (packets: :mod:`pykvm.gdbstub.packets`); each
architecture is one module implementing :class:`pykvm.gdbstub.arch.GdbTarget`
(:mod:`pykvm.gdbstub.x86`, :mod:`pykvm.gdbstub.riscv`), chosen by the one lookup in
:mod:`pykvm.gdbstub.targets`. See docs/gdb.md.
"""
