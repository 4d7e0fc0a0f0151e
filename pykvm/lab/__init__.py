"""Labs: pykvm's inner test suites on real KVM inside QEMU (RISC-V with the H extension; nested x86).

``python -m pykvm.lab --help``.  Modules: ``debian`` (indexes, checksummed downloads, .deb unpacking),
``initramfs`` (newc cpio writer, /init), ``qemu`` (obtaining and booting QEMU, collecting results),
``build`` (the two labs), ``progress`` (what a lab shows while it works: bars or plain lines),
``proc`` (child processes, signals, the cache's file locks).
"""
