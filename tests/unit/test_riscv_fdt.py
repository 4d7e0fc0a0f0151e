"""RISC-V devicetree writer: round trip through a small parser (and dtc if
it is installed)."""

import shutil
import struct
import subprocess

import pytest

from pykvm.platform import fdt as F


def parse_dtb(blob):
    """A minimal independent DTB parser: returns (header dict, tree) where a
    tree node is {"props": {name: bytes}, "children": {name: node}}."""
    fields = ("magic", "totalsize", "off_dt_struct", "off_dt_strings", "off_mem_rsvmap",
              "version", "last_comp_version", "boot_cpuid_phys", "size_dt_strings",
              "size_dt_struct")
    hdr = dict(zip(fields, struct.unpack_from(">10I", blob, 0)))
    assert hdr["magic"] == 0xD00DFEED
    assert hdr["totalsize"] == len(blob)
    rsv = []
    off = hdr["off_mem_rsvmap"]
    assert off % 8 == 0
    while True:
        a, s = struct.unpack_from(">QQ", blob, off)
        off += 16
        if a == 0 and s == 0:
            break
        rsv.append((a, s))
    hdr["reserve"] = rsv
    strings = blob[hdr["off_dt_strings"]:hdr["off_dt_strings"] + hdr["size_dt_strings"]]
    pos = hdr["off_dt_struct"]
    end = pos + hdr["size_dt_struct"]
    stack = []
    root = None
    while pos < end:
        (tok,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if tok == 1:
            nul = blob.index(b"\0", pos)
            name = blob[pos:nul].decode()
            pos = (nul + 1 + 3) & ~3
            node = {"props": {}, "children": {}}
            if stack:
                assert name not in stack[-1]["children"]
                stack[-1]["children"][name] = node
            else:
                assert name == ""
                root = node
            stack.append(node)
        elif tok == 3:
            ln, noff = struct.unpack_from(">II", blob, pos)
            pos += 8
            pname = strings[noff:strings.index(b"\0", noff)].decode()
            stack[-1]["props"][pname] = blob[pos:pos + ln]
            pos = (pos + ln + 3) & ~3
        elif tok == 2:
            stack.pop()
        elif tok == 4:
            continue
        elif tok == 9:
            assert not stack
            break
        else:
            raise AssertionError(f"bad token {tok}")
    assert pos == end
    return hdr, root


def u32(b):
    return struct.unpack(">I", b)[0]


def strs(b):
    assert b.endswith(b"\0")
    return b[:-1].decode().split("\0")


HARTS = [
    {"hartid": 0, "isa": "rv64imafdc_zicsr_zifencei_zabha", "mmu_type": 8},
    {"hartid": 1, "isa": "rv64imafdc_zicsr_zifencei_zabha", "mmu_type": 10},
    {"hartid": 2, "isa": "rv64imac", "mmu_type": 0},
]


def test_build_dtb_round_trip():
    blob = F.build_dtb(HARTS, 0x80000000, 0x10000000, 10_000_000, "console=hvc0 quiet")
    hdr, root = parse_dtb(blob)
    assert hdr["version"] == 17 and hdr["last_comp_version"] == 16
    assert hdr["boot_cpuid_phys"] == 0 and hdr["reserve"] == []
    assert len(blob) % 8 == 0
    assert u32(root["props"]["#address-cells"]) == 2
    assert u32(root["props"]["#size-cells"]) == 2
    assert strs(root["children"]["chosen"]["props"]["bootargs"]) == ["console=hvc0 quiet"]
    cpus = root["children"]["cpus"]
    assert u32(cpus["props"]["timebase-frequency"]) == 10_000_000
    assert u32(cpus["props"]["#address-cells"]) == 1 and u32(cpus["props"]["#size-cells"]) == 0
    assert sorted(cpus["children"]) == ["cpu@0", "cpu@1", "cpu@2"]
    c0 = cpus["children"]["cpu@0"]["props"]
    assert strs(c0["device_type"]) == ["cpu"]
    assert u32(c0["reg"]) == 0
    assert strs(c0["status"]) == ["okay"]
    assert strs(c0["compatible"]) == ["riscv"]
    assert strs(c0["riscv,isa"]) == ["rv64imafdc_zicsr_zifencei_zabha"]
    assert strs(c0["riscv,isa-base"]) == ["rv64i"]
    assert strs(c0["riscv,isa-extensions"]) == ["i", "m", "a", "f", "d", "c", "zicsr",
                                                "zifencei", "zabha"]
    assert strs(c0["mmu-type"]) == ["riscv,sv39"]
    assert strs(cpus["children"]["cpu@1"]["props"]["mmu-type"]) == ["riscv,sv57"]
    assert "mmu-type" not in cpus["children"]["cpu@2"]["props"]
    phandles = set()
    for cpu in cpus["children"].values():
        intc = cpu["children"]["interrupt-controller"]["props"]
        assert strs(intc["compatible"]) == ["riscv,cpu-intc"]
        assert intc["interrupt-controller"] == b""
        assert u32(intc["#interrupt-cells"]) == 1
        phandles.add(u32(intc["phandle"]))
    assert len(phandles) == 3
    mem = root["children"]["memory@80000000"]["props"]
    assert strs(mem["device_type"]) == ["memory"]
    assert struct.unpack(">QQ", mem["reg"]) == (0x80000000, 0x10000000)


def test_writer_details():
    root = F.Node("")
    root.set("u64", F.U64(0x1122334455667788)).set("cells", [1, 2, 3]).set("empty", F.EMPTY)
    root.set("raw", b"\x01\x02\x03").set("list", ["a", "bc"])
    root.child("child@1", reg=5)
    blob = F.to_dtb(root, boot_cpuid=3, reserve=[(0x1000, 0x2000)])
    hdr, tree = parse_dtb(blob)
    assert hdr["boot_cpuid_phys"] == 3 and hdr["reserve"] == [(0x1000, 0x2000)]
    p = tree["props"]
    assert p["u64"] == bytes.fromhex("1122334455667788")
    assert p["cells"] == struct.pack(">3I", 1, 2, 3)
    assert p["empty"] == b"" and p["raw"] == b"\x01\x02\x03"
    assert p["list"] == b"a\0bc\0"
    assert u32(tree["children"]["child@1"]["props"]["reg"]) == 5
    # property names are stored once in the strings block
    assert blob.count(b"reg\0") == 1
    with pytest.raises(ValueError):
        F.to_dtb(F.Node("", {"big": 1 << 32}))
    with pytest.raises(ValueError):
        F.build_dtb([], 0, 0, 1)
    with pytest.raises(ValueError):
        F.build_dtb([{"hartid": 0, "isa": "rv64i", "mmu_type": 7}], 0, 0x1000, 1)


def test_dtc_accepts_the_blob(tmp_path):
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.skip("dtc not installed (apt-get install device-tree-compiler)")
    blob = F.build_dtb(HARTS, 0x80000000, 0x10000000, 10_000_000, "quiet")
    p = tmp_path / "t.dtb"
    p.write_bytes(blob)
    out = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(p)], capture_output=True,
                         text=True, check=True)
    dts = out.stdout
    assert 'riscv,isa = "rv64imafdc_zicsr_zifencei_zabha";' in dts
    assert 'mmu-type = "riscv,sv39";' in dts
    assert "timebase-frequency = <0x989680>;" in dts
    assert "reg = <0x00 0x80000000 0x00 0x10000000>;" in dts
    assert 'bootargs = "quiet";' in dts
    assert "interrupt-controller;" in dts
    assert "Warning" not in out.stderr and "ERROR" not in out.stderr, out.stderr
    # and back again: dtc's own blob of our source parses to the same tree
    again = subprocess.run([dtc, "-I", "dts", "-O", "dtb"], input=dts.encode(),
                           capture_output=True, check=True).stdout
    assert parse_dtb(again)[1] == parse_dtb(blob)[1]


def test_uart_node_and_stdout_path_as_qemu_virt():
    blob = F.build_dtb(HARTS[:1], 0x80000000, 0x4000000, 10_000_000, "",
                       uart_base=F.UART_BASE)
    _, root = parse_dtb(blob)
    chosen = root["children"]["chosen"]["props"]
    assert strs(chosen["stdout-path"]) == ["/soc/serial@10000000"]
    assert "linux,initrd-start" not in chosen
    soc = root["children"]["soc"]
    assert strs(soc["props"]["compatible"]) == ["simple-bus"] and soc["props"]["ranges"] == b""
    assert u32(soc["props"]["#address-cells"]) == 2 and u32(soc["props"]["#size-cells"]) == 2
    uart = soc["children"]["serial@10000000"]["props"]
    assert strs(uart["compatible"]) == ["ns16550a"]
    assert struct.unpack(">QQ", uart["reg"]) == (0x10000000, 0x100)
    assert u32(uart["clock-frequency"]) == 3686400
    assert "interrupts" not in uart                 # no interrupt controller: drivers poll
    # without a UART: neither the node nor stdout-path
    _, plain = parse_dtb(F.build_dtb(HARTS[:1], 0x80000000, 0x4000000, 1))
    assert "soc" not in plain["children"] and "stdout-path" not in \
        plain["children"]["chosen"]["props"]


def test_initrd_in_chosen_as_64_bit_values():
    _, root = parse_dtb(F.build_dtb(HARTS[:1], 0x80000000, 0x4000000, 1,
                                    initrd=(0x83ff0000, 0x83ff0123)))
    chosen = root["children"]["chosen"]["props"]
    assert struct.unpack(">Q", chosen["linux,initrd-start"]) == (0x83ff0000,)
    assert struct.unpack(">Q", chosen["linux,initrd-end"]) == (0x83ff0123,)
    with pytest.raises(ValueError):
        F.build_dtb(HARTS[:1], 0x80000000, 0x4000000, 1, initrd=(0x2000, 0x1000))


def test_dtc_accepts_uart_and_initrd(tmp_path):
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.skip("dtc not installed (apt-get install device-tree-compiler)")
    p = tmp_path / "t.dtb"
    p.write_bytes(F.build_dtb(HARTS[:1], 0x80000000, 0x4000000, 1, uart_base=F.UART_BASE,
                              initrd=(0x83ff0000, 0x83ff0123)))
    out = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(p)], capture_output=True,
                         text=True, check=True)
    assert 'stdout-path = "/soc/serial@10000000";' in out.stdout
    assert 'compatible = "ns16550a";' in out.stdout
    assert "Warning" not in out.stderr and "ERROR" not in out.stderr, out.stderr
