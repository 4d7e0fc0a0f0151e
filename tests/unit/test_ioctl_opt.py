"""ioctl-opt computes pykvm's ioctl request numbers, from the sizes of pykvm's own cffi
declarations (issue 17, item 5), when pykvm is built (csrc/build_native.py compiles them into
pykvm._native; issue 18: importing pykvm loads neither ioctl-opt nor ctypes). That the numbers
equal the kernel's is the header proof's job (tests/unit/test_abi_proof.py compiles
<linux/kvm.h>); these tests show who computes them, at build time and for a stale build."""
import ast
import inspect
import json
import os
import runpy
import subprocess
import sys

import ioctl_opt
import pytest

from pykvm import _native
from pykvm.abi import KVMIO, ffi, ioctls

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIRS = {ioctls.NONE: ioctl_opt.IOC_NONE, ioctls.W: ioctl_opt.IOC_WRITE,
        ioctls.R: ioctl_opt.IOC_READ, ioctls.WR: ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}


def _size(row) -> int:
    return ffi.sizeof(row.arg) if row.arg else 0


def _ioc_now(row) -> int:
    """ioctl_opt.IOC of the row, recomputed here."""
    return ioctl_opt.IOC(DIRS[row.direction], KVMIO, row.nr, _size(row))


def _shifts(source: str) -> list:
    tree = ast.parse(source)
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.LShift)]


def _arg_buffer(ctype: str) -> memoryview:
    """A zeroed C object of ``ctype`` as a memoryview, whose length ioctl-opt takes as the
    argument size (bytes)."""
    return memoryview(ffi.buffer(ffi.new(f"{ctype} *")))


def test_the_table_and_its_builder_use_ioctl_opt_and_have_no_formula_of_their_own():
    """The builder computes the compiled numbers with ioctl_opt.IOC; the table module's ioc()
    (a stale build, a new row) does too; neither composes dir | type | nr | size itself."""
    builder = open(os.path.join(ROOT, "csrc", "build_native.py")).read()
    numbers = inspect.getsource(runpy.run_path(os.path.join(ROOT, "csrc", "build_native.py"),
                                               run_name="x")["ioctl_numbers"])
    assert "import ioctl_opt" in numbers and "ioctl_opt.IOC(" in numbers
    tree = ast.parse(inspect.getsource(ioctls.ioc))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"ioctl_opt"}
    assert "ioctl_opt.IOC(" in inspect.getsource(ioctls.ioc)
    for path, source in (("pykvm/abi/ioctls.py", inspect.getsource(ioctls)),
                         ("pykvm/abi/ioctl_rows.py", open(os.path.join(
                             ROOT, "pykvm", "abi", "ioctl_rows.py")).read()),
                         ("csrc/build_native.py", builder)):
        assert not _shifts(source), f"{path} shifts bits itself at lines {_shifts(source)}"


def test_a_current_build_carries_every_rows_number_as_ioctl_opt_gives_it_now():
    """The table compiled into pykvm._native has one number per row of this architecture, each
    equal to ioctl_opt.IOC recomputed now over our declarations' sizes, and the rows use it."""
    assert ioctls.COMPILED, "pykvm._native has no current ioctl table: run `pip install -e .`"
    built = ioctls.compiled_numbers()
    rows = ioctls.available()
    assert len(rows) >= 25
    assert set(built) == {ioctls.ioctl_key(r.name, r.direction, r.nr, KVMIO, r.arg)
                          for r in rows}
    for r in rows:
        key = ioctls.ioctl_key(r.name, r.direction, r.nr, KVMIO, r.arg)
        assert built[key] == _ioc_now(r) == int(r), r.name
    text = _native.ffi.string(_native.lib.pykvm_ioctl_text()).decode()
    assert f"KVM_GET_ONE_REG w 0xab 0xae struct kvm_one_reg {_ioc_now(ioctls.KVM_GET_ONE_REG):#x}" \
        in text.splitlines()


def test_importing_pykvm_computes_no_number():
    """A current build: importing the machine layer loads neither ioctl-opt nor ctypes."""
    code = ("import sys, pykvm.machine, pykvm.abi.ioctls as i\n"
            "print(i.COMPILED, 'ioctl_opt' in sys.modules, 'ctypes' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False", "False"]


# Run in a fresh interpreter before pykvm.abi is imported: pykvm._native is either absent or was
# built from other ABI declarations than today's (its pykvm_abi_text() differs), the two stale
# cases pykvm.abi tells apart from a current build.
_STALE = {
    "not built": "sys.modules['pykvm._native'] = None\n",
    "other declarations": (
        "import types, pykvm, pykvm._native as real\n"
        "old = real.ffi.new('char[]', b'struct kvm_other { int x; };')\n"
        "lib = types.SimpleNamespace(pykvm_abi_text=lambda: old,\n"
        "                            pykvm_ioctl_text=real.lib.pykvm_ioctl_text)\n"
        "stale = types.SimpleNamespace(ffi=real.ffi, lib=lib)\n"
        "sys.modules['pykvm._native'] = pykvm._native = stale\n"),
}


@pytest.mark.parametrize("stale", sorted(_STALE))
def test_a_stale_build_computes_the_same_numbers_with_ioctl_opt(stale):
    code = ("import json, sys\n" + _STALE[stale] +
            "from pykvm import abi\nfrom pykvm.abi import ioctls\n"
            "print(json.dumps([abi.COMPILED, ioctls.COMPILED, 'ioctl_opt' in sys.modules,\n"
            "                  {r.name: int(r) for r in ioctls.TABLE}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    abi_compiled, table_compiled, loaded, numbers = json.loads(r.stdout)
    assert (abi_compiled, table_compiled, loaded) == (False, False, True)
    assert numbers == {r.name: int(r) for r in ioctls.TABLE}
    assert all(numbers[r.name] == _ioc_now(r) for r in ioctls.available())


def test_a_row_edited_since_the_build_is_computed_again():
    """A row whose fields differ from the compiled one (here its direction) finds no compiled
    number under its key and gets ioctl-opt's for what it says now."""
    r = ioctls.KVM_GET_ONE_REG
    edited = ioctls.Ioctl(r.name, r.fd, ioctls.WR, r.nr, r.arg, r.cap, r.arches)
    assert int(edited) == ioctl_opt.IOC(DIRS[ioctls.WR], KVMIO, r.nr, _size(r)) != int(r)


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
    rows = ioctls.available()
    assert len(rows) >= 25
    for r in rows:
        got = (ioctl_opt.IOC_DIR(r), ioctl_opt.IOC_TYPE(r), ioctl_opt.IOC_NR(r),
               ioctl_opt.IOC_SIZE(r))
        assert got == (DIRS[r.direction], KVMIO, r.nr, _size(r)), r.name


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


def test_every_row_pickles_and_copies_to_itself():
    import copy
    import pickle
    from pykvm.abi import ioctls
    for r in ioctls.TABLE:
        assert pickle.loads(pickle.dumps(r)) is r, r.name
        assert copy.deepcopy(r) is r and copy.copy(r) is r
    assert ioctls.row("KVM_RUN") is ioctls.KVM_RUN
