"""The guest-side vsnprintf (guests/common/printf.c), compiled for the host and called through
ctypes: both the native 64-bit division and the shift-and-subtract path 32-bit guests use."""
import ctypes
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUESTS = os.path.join(REPO, "guests")


@pytest.fixture(scope="module", params=["native-div", "soft-div"])
def snprintf(request, tmp_path_factory):
    if shutil.which("gcc") is None or os.uname().machine != "x86_64":
        pytest.skip("needs the x86_64 host gcc")
    so = tmp_path_factory.mktemp("printf") / f"printf-{request.param}.so"
    extra = ["-DPYKVM_PRINTF_SOFT_DIV"] if request.param == "soft-div" else []
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-ffreestanding", "-fno-builtin",
                    "-I", os.path.join(GUESTS, "include"), *extra,
                    os.path.join(GUESTS, "common", "printf.c"), "-o", str(so)],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(so))

    def fmt(f, *args, size=256):
        buf = ctypes.create_string_buffer(size)
        n = lib.pykvm_snprintf(buf, ctypes.c_size_t(size), f.encode(), *args)
        return buf.value.decode(), n
    return fmt


L, LL, I, U = ctypes.c_long, ctypes.c_longlong, ctypes.c_int, ctypes.c_uint  # noqa: E741 — C types


@pytest.mark.parametrize("f,args,want", [
    ("plain", (), "plain"),
    ("%d|%i", (I(-5), I(7)), "-5|7"),
    ("%u", (U(4294967295),), "4294967295"),
    ("%x %X", (U(0xBEEF), U(0xBEEF)), "beef BEEF"),
    ("%08x", (U(0x1234),), "00001234"),
    ("%05d", (I(-42),), "-0042"),
    ("%5d|%-5d|", (I(42), I(42)), "   42|42   |"),
    ("%lx", (L(0xFFFFFFFF80000000),), "ffffffff80000000"),
    ("%llx", (LL(0x123456789ABCDEF0),), "123456789abcdef0"),
    ("%lu", (L(18446744073709551615 - (1 << 64)),), "18446744073709551615"),
    ("%ld", (L(-9223372036854775807 - 1),), "-9223372036854775808"),
    ("%llu", (LL(10000000000000000000 - (1 << 64)),), "10000000000000000000"),
    ("%s and %s", (b"abc", None), "abc and (null)"),
    ("[%-6s][%6s]", (b"ab", b"cd"), "[ab    ][    cd]"),
    ("%c%c", (I(ord("o")), I(ord("k"))), "ok"),
    ("%p", (ctypes.c_void_p(0x1000),), "0x1000"),
    ("100%%", (), "100%"),
    ("%hhx %hx", (I(0x1FF), I(0x12345)), "ff 2345"),
    ("%zu", (ctypes.c_size_t(123),), "123"),
    ("%d", (I(0),), "0"),
])
def test_formats(snprintf, f, args, want):
    got, n = snprintf(f, *args)
    assert got == want and n == len(want)


def test_truncation_returns_full_length(snprintf):
    got, n = snprintf("%s", b"0123456789", size=5)
    assert got == "0123" and n == 10
