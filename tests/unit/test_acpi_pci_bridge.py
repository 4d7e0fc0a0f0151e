"""The DSDT's PCI root bridge (\\_SB.PCI0): walked as an ACPI OS's AML parser reads it — package
lengths consistent to the byte, the EISA id PNP0A03, the _CRS resource descriptors (bus range,
configuration ports, I/O and memory windows) and a _PRT entry per slot and pin."""
import struct

import pytest

from pykvm.platform import acpi


def pkglength(data, i):
    """(length, bytes it took) of the AML PkgLength at data[i] (ACPI 6.5, 20.2.4)."""
    lead = data[i]
    extra = lead >> 6
    if not extra:
        return lead & 0x3F, 1
    n = lead & 0x0F
    for k in range(extra):
        n |= data[i + 1 + k] << (4 + 8 * k)
    return n, 1 + extra


def integer(data, i):
    op = data[i]
    if op in (0, 1):
        return op, 1
    n = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    return int.from_bytes(data[i + 1:i + 1 + n], "little"), 1 + n


def parse_package(data, i):
    assert data[i] == 0x12
    ln, k = pkglength(data, i + 1)
    end = i + 1 + ln
    count = data[i + 1 + k]
    j, elems = i + 2 + k, []
    while j < end:
        if data[j] == 0x12:
            sub, j = parse_package(data, j)
            elems.append(sub)
        else:
            v, n = integer(data, j)
            elems.append(v)
            j += n
    assert j == end and len(elems) == count
    return elems, end


def named(body, name):
    i = body.index(b"\x08" + name) + 5
    return i


def resources(crs):
    out, i = [], 0
    while True:
        tag = crs[i]
        if tag == 0x79:
            return out
        if tag & 0x80:
            ln = struct.unpack_from("<H", crs, i + 1)[0]
            out.append((tag, crs[i + 3:i + 3 + ln]))
            i += 3 + ln
        else:
            ln = tag & 7
            out.append((tag & 0xF8, crs[i + 1:i + 1 + ln]))
            i += 1 + ln


@pytest.fixture(scope="module")
def pci0():
    d = acpi.dsdt(pci_hole_start=0x8000000)
    assert sum(d) % 256 == 0 and struct.unpack_from("<I", d, 4)[0] == len(d)
    aml = d[36:]
    i = aml.index(b"\x10")
    while aml[i + 1 + pkglength(aml, i + 1)[1]:][:5] != b"\\_SB_":
        i = aml.index(b"\x10", i + 1)
    ln, k = pkglength(aml, i + 1)
    assert i + 1 + ln == len(aml)                   # the scope runs to the table's end
    j = i + 1 + k + 5
    assert aml[j:j + 2] == b"\x5B\x82"
    dl, dk = pkglength(aml, j + 2)
    assert j + 2 + dl == len(aml)                   # and so does the device inside it
    body = aml[j + 2 + dk:]
    assert body[:4] == b"PCI0"
    return body


def test_identity(pci0):
    i = named(pci0, b"_HID")
    assert pci0[i:i + 5] == b"\x0C\x41\xD0\x0A\x03"   # EISAID("PNP0A03")
    for name in (b"_ADR", b"_UID", b"_BBN"):
        assert integer(pci0, named(pci0, name))[0] == 0


def test_resources(pci0):
    i = named(pci0, b"_CRS")
    assert pci0[i] == 0x11
    ln, k = pkglength(pci0, i + 1)
    size, n = integer(pci0, i + 1 + k)
    crs = pci0[i + 1 + k + n:i + 1 + k + n + size]
    res = resources(crs)
    words = [struct.unpack("<BBBHHHHH", b) for t, b in res if t == 0x88]
    assert (2, 0x0C, 0, 0, 0, 0xFF, 0, 0x100) in words                  # bus 0-255
    io = [(w[4], w[5]) for w in words if w[0] == 1]
    assert io == [(0, 0xCF7), (0xD00, 0xFFFF)]                           # all but conf1
    assert (0x40, struct.pack("<BHHBB", 1, 0xCF8, 0xCF8, 1, 8)) in res
    mem = [struct.unpack("<BBBIIIII", b) for t, b in res if t == 0x87]
    assert [(m[4], m[5], m[7]) for m in mem] == [(0xA0000, 0xBFFFF, 0x20000),
                                                  (0x8000000, 0xFEBFFFFF, 0xFEC00000 - 0x8000000)]


def test_prt_routes_every_slot_and_pin_to_its_pirq(pci0):
    prt, _ = parse_package(pci0, named(pci0, b"_PRT"))
    assert len(prt) == 31 * 4
    for addr, pin, source, gsi in prt:
        slot = addr >> 16
        assert addr & 0xFFFF == 0xFFFF and source == 0
        assert gsi == (10, 10, 11, 11)[(slot + pin) & 3]


def test_without_a_hole_there_is_no_bridge():
    assert b"PCI0" not in acpi.dsdt() and b"PCI0" in acpi.dsdt(0x100000)


@pytest.mark.parametrize("n", [0, 62, 63, 64, 4000, 4093, 4094, 70000])
def test_pkglength_round_trips(n):
    enc = acpi._aml_pkglength(n)
    got, k = pkglength(enc + bytes(4), 0)
    assert k == len(enc) and got == n + len(enc)
