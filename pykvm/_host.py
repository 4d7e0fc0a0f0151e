"""The host's architecture, as pykvm names it: the one place it is read."""
import os


def host_arch() -> str:
    """The host's machine name as ``os.uname()`` reports it ("amd64" spelled "x86_64"): "x86_64",
    "riscv64", or another machine's name, which pykvm has no KVM ABI for."""
    m = os.uname().machine
    return "x86_64" if m in ("x86_64", "amd64") else m


HOST_ARCH = host_arch()
