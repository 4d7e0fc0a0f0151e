"""Facts that must hold inside a lab (run by ``python -m pykvm.lab``, never on the host).

These run in the lab's own Python on the lab's kernel; outside a lab (recognised by /lab/lab.conf,
which only the lab image has) the module skips itself.
"""

import fcntl
import os
import platform
import sys

import pytest

LAB_CONF = "/lab/lab.conf"
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(not os.path.exists(LAB_CONF), reason="runs only inside a pykvm lab"),
]


def _kvm_get_api_version() -> int:
    from ioctl_opt import IO

    return IO(0xAE, 0x00)


def test_ioctl_number():
    assert _kvm_get_api_version() == 0xAE00


def test_dev_kvm_api_version():
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, _kvm_get_api_version()) == 12
    finally:
        os.close(fd)


def test_kvm_module_loaded():
    assert os.path.isdir("/sys/module/kvm")


def test_arch():
    machine = platform.machine()
    assert machine in ("riscv64", "x86_64")
    if machine == "x86_64":
        # the nested lab: KVM inside is kvm_amd with nested SVM
        assert open("/sys/module/kvm_amd/parameters/nested").read().strip() in ("1", "Y")
        assert " svm" in open("/proc/cpuinfo").read()
    else:
        isa = next(line for line in open("/proc/cpuinfo") if line.startswith("isa"))
        assert "h" in isa.split(":", 1)[1].strip().split("_")[0][4:]


def test_guest_python():
    expected = {"riscv64": (3, 13), "x86_64": (3, 11)}[platform.machine()]
    assert sys.version_info[:2] == expected


def test_create_vm():
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        from ioctl_opt import IO

        vm = fcntl.ioctl(fd, IO(0xAE, 0x01), 0)  # KVM_CREATE_VM
        assert vm >= 0
        os.close(vm)
    finally:
        os.close(fd)


def test_native_extension_imports():
    """The lab ships pykvm._native built for its own arch (cross-built for riscv64) when csrc has a builder."""
    import glob
    import importlib

    here = os.path.dirname(os.path.abspath(__file__))
    pkg = os.path.join(here, "..", "..", "..", "pykvm")
    if not glob.glob(os.path.join(pkg, "_native*.so")):
        pytest.skip("pykvm._native not shipped in this lab image")
    mod = importlib.import_module("pykvm._native")
    assert hasattr(mod, "ffi") and hasattr(mod, "lib")
