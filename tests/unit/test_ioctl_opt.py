"""ioctl-opt computes pykvm's ioctl request numbers, from the sizes of pykvm's own cffi
declarations (issue 17, item 5). That the numbers equal the kernel's is the header proof's job
(tests/unit/test_abi_proof.py compiles <linux/kvm.h>); these tests show who computes them."""
import ast
import inspect
import subprocess
import sys

import ioctl_opt
import pytest

from pykvm.abi import KVMIO, ffi, ioctls


def _arg_buffer(ctype: str) -> memoryview:
    """A zeroed C object of ``ctype`` as a memoryview, whose length ioctl-opt takes as the
    argument size (bytes)."""
    return memoryview(ffi.buffer(ffi.new(f"{ctype} *")))


def test_the_table_module_imports_ioctl_opt_and_has_no_formula_of_its_own():
    assert ioctls.ioctl_opt is sys.modules["ioctl_opt"]
    tree = ast.parse(inspect.getsource(ioctls))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "ioctl_opt" in imported
    # composing dir | type | nr | size is ioctl-opt's work: no left shift is left in the table
    shifts = [n.lineno for n in ast.walk(tree)
              if isinstance(n, ast.BinOp) and isinstance(n.op, ast.LShift)]
    assert not shifts, f"pykvm/abi/ioctls.py shifts bits itself at lines {shifts}"


def test_a_new_row_gets_its_number_from_ioctl_opt(monkeypatch):
    """Building a row calls ioctl_opt.IOC(dir, KVMIO, nr, sizeof(arg)) and the row is its
    result."""
    calls = []
    real = ioctl_opt.IOC

    def recording(direction, type_, nr, size):
        calls.append((direction, type_, nr, size))
        return real(direction, type_, nr, size)
    monkeypatch.setattr(ioctl_opt, "IOC", recording)
    row = ioctls.Ioctl("KVM_GET_ONE_REG_AGAIN", "vcpu", ioctls.WR, 0xAB, "struct kvm_one_reg")
    size = ffi.sizeof("struct kvm_one_reg")
    assert calls == [(ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE, KVMIO, 0xAB, size)]
    assert int(row) == real(ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE, KVMIO, 0xAB, size)


@pytest.mark.parametrize("name, make, ctype", [
    ("KVM_RUN", lambda nr, buf: ioctl_opt.IO(KVMIO, nr), None),
    ("KVM_CREATE_VM", lambda nr, buf: ioctl_opt.IO(KVMIO, nr), None),
    ("KVM_GET_MP_STATE", lambda nr, buf: ioctl_opt.IOR(KVMIO, nr, buf), "struct kvm_mp_state"),
    ("KVM_SET_USER_MEMORY_REGION", lambda nr, buf: ioctl_opt.IOW(KVMIO, nr, buf),
     "struct kvm_userspace_memory_region"),
    ("KVM_SET_USER_MEMORY_REGION2", lambda nr, buf: ioctl_opt.IOW(KVMIO, nr, buf),
     "struct kvm_userspace_memory_region2"),
    ("KVM_GET_REG_LIST", lambda nr, buf: ioctl_opt.IOWR(KVMIO, nr, buf), "struct kvm_reg_list"),
    ("KVM_CLEAR_DIRTY_LOG", lambda nr, buf: ioctl_opt.IOWR(KVMIO, nr, buf),
     "struct kvm_clear_dirty_log"),
])
def test_rows_equal_ioctl_opts_io_ior_iow_iowr_of_our_structs(name, make, ctype):
    row = ioctls.BY_NAME[name]
    assert row.available and row.arg == ctype
    assert row.request == make(row.nr, _arg_buffer(ctype) if ctype else None)


def test_every_row_decodes_with_ioctl_opt_to_its_own_fields():
    dirs = {ioctls.NONE: ioctl_opt.IOC_NONE, ioctls.W: ioctl_opt.IOC_WRITE,
            ioctls.R: ioctl_opt.IOC_READ, ioctls.WR: ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}
    rows = ioctls.available()
    assert len(rows) >= 25
    for r in rows:
        size = ffi.sizeof(r.arg) if r.arg else 0
        got = (ioctl_opt.IOC_DIR(r), ioctl_opt.IOC_TYPE(r), ioctl_opt.IOC_NR(r),
               ioctl_opt.IOC_SIZE(r))
        assert got == (dirs[r.direction], KVMIO, r.nr, size), r.name


@pytest.mark.parametrize("args, match", [
    ((ioctls.W, 0x01, 1 << 14), "does not fit the request number"),
    ((ioctls.W, 0x01, -1), "does not fit the request number"),
    ((ioctls.R, 0x100, 8), "does not fit 8 bits"),
    ((ioctls.R, -1, 8), "does not fit 8 bits"),
    (("rw", 0x01, 8), "is not one of"),
])
def test_a_field_that_does_not_fit_is_a_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ioctls.ioc(*args)


def test_the_largest_size_fits():
    assert ioctl_opt.IOC_SIZE(ioctls.ioc(ioctls.W, 0x01, (1 << 14) - 1)) == (1 << 14) - 1


def test_the_checks_hold_under_python_dash_O():
    """ioctl-opt only asserts its field ranges; pykvm's ValueError stays when asserts are off."""
    code = ("from pykvm.abi import ioctls\n"
            "for a in (('w', 1, 1 << 14), ('r', 0x100, 8)):\n"
            "    try:\n"
            "        ioctls.ioc(*a)\n"
            "    except ValueError:\n"
            "        print('ValueError')\n")
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ValueError", "ValueError"]
