"""The RISC-V virt machine's AIA and virtio-mmio device-tree nodes (read back by an independent
parser and by dtc where installed), the AIA layout helpers, and the one-line refusal of virtio
devices on a host whose KVM has no AIA irqchip (this x86 host's real /dev/kvm)."""

import shutil
import struct
import subprocess

import pytest

from pykvm.arch.riscv import aia as A
from pykvm.platform import fdt as F

from test_riscv_fdt import parse_dtb, strs, u32

HARTS = [{"hartid": i, "isa": "rv64imafdc_ssaia", "mmu_type": 9} for i in range(3)]
AIA = F.AiaNodes(imsic_base=A.IMSIC_BASE, imsic_stride=A.imsic_stride(0), num_ids=255,
                 aplic_base=A.APLIC_BASE, aplic_size=A.APLIC_SIZE, num_sources=96)
VIRTIO = [F.VirtioMmioNode(base=F.VIRTIO_MMIO_BASE + i * F.VIRTIO_MMIO_STRIDE,
                           size=F.VIRTIO_MMIO_STRIDE, irq=F.VIRTIO_MMIO_IRQ + i) for i in range(2)]


def cells(b):
    return list(struct.unpack(f">{len(b) // 4}I", b))


def _tree(**kw):
    args = dict(uart_base=F.UART_BASE, aia=AIA, virtio_mmio=VIRTIO)
    args.update(kw)
    blob = F.build_dtb(HARTS, 0x80000000, 256 << 20, 10_000_000, "console=ttyS0", **args)
    return blob, parse_dtb(blob)[1]


def _phandles(root):
    out = {}

    def walk(path, node):
        if "phandle" in node["props"]:
            ph = u32(node["props"]["phandle"])
            assert ph not in out, f"phandle {ph} twice"
            out[ph] = path
        for name, ch in node["children"].items():
            walk(f"{path}/{name}", ch)
    walk("", root)
    return out


def test_imsic_node_as_qemu_virt_writes_it():
    _, root = _tree()
    soc = root["children"]["soc"]
    imsic = soc["children"]["interrupt-controller@28000000"]["props"]
    assert strs(imsic["compatible"]) == ["riscv,imsics"]
    assert imsic["interrupt-controller"] == b"" and imsic["msi-controller"] == b""
    assert u32(imsic["#interrupt-cells"]) == 0 and u32(imsic["#msi-cells"]) == 0
    assert cells(imsic["reg"]) == [0, 0x28000000, 0, 3 * 0x1000]     # one file per hart
    assert u32(imsic["riscv,num-ids"]) == 255
    assert "riscv,guest-index-bits" not in imsic
    # each hart's S-level external interrupt (9) on its own cpu-intc, in hart order
    cpus = root["children"]["cpus"]["children"]
    intc = [u32(cpus[f"cpu@{i}"]["children"]["interrupt-controller"]["props"]["phandle"])
            for i in range(3)]
    assert cells(imsic["interrupts-extended"]) == [intc[0], 9, intc[1], 9, intc[2], 9]


def test_aplic_node_points_at_the_imsic():
    _, root = _tree()
    soc = root["children"]["soc"]["children"]
    aplic = soc["interrupt-controller@d000000"]["props"]
    imsic = soc["interrupt-controller@28000000"]["props"]
    assert strs(aplic["compatible"]) == ["riscv,aplic"]
    assert aplic["interrupt-controller"] == b""
    assert u32(aplic["#interrupt-cells"]) == 2 and u32(aplic["#address-cells"]) == 0
    assert u32(aplic["msi-parent"]) == u32(imsic["phandle"])
    assert cells(aplic["reg"]) == [0, 0x0D000000, 0, 0x4000]
    assert u32(aplic["riscv,num-sources"]) == 96
    assert "interrupts-extended" not in aplic          # MSI mode: no wired lines to the harts


def test_virtio_mmio_nodes_at_qemu_virt_slots_on_the_aplic():
    _, root = _tree()
    soc = root["children"]["soc"]["children"]
    aplic_ph = u32(soc["interrupt-controller@d000000"]["props"]["phandle"])
    names = [n for n in soc if n.startswith("virtio_mmio@")]
    assert names == ["virtio_mmio@10001000", "virtio_mmio@10002000"]     # device order kept
    for i, name in enumerate(names):
        p = soc[name]["props"]
        assert strs(p["compatible"]) == ["virtio,mmio"]
        assert cells(p["reg"]) == [0, 0x10001000 + i * 0x1000, 0, 0x1000]
        assert u32(p["interrupt-parent"]) == aplic_ph
        assert cells(p["interrupts"]) == [1 + i, 4]      # source 1+i, IRQ_TYPE_LEVEL_HIGH


def test_phandles_unique_and_resolvable():
    _, root = _tree()
    ph = _phandles(root)
    assert sorted(ph) == [1, 2, 3, 4, 5]                 # 3 cpu-intc, IMSIC, APLIC
    assert ph[4].endswith("/soc/interrupt-controller@28000000")
    assert ph[5].endswith("/soc/interrupt-controller@d000000")


def test_without_aia_the_tree_is_as_before():
    blob_plain = F.build_dtb(HARTS, 0x80000000, 256 << 20, 10_000_000, "", uart_base=F.UART_BASE)
    blob_none = F.build_dtb(HARTS, 0x80000000, 256 << 20, 10_000_000, "", uart_base=F.UART_BASE,
                            aia=None, virtio_mmio=())
    assert blob_plain == blob_none
    soc = parse_dtb(blob_plain)[1]["children"]["soc"]["children"]
    assert list(soc) == ["serial@10000000"]


def test_aia_without_uart_still_has_a_soc():
    _, root = _tree(uart_base=None)
    assert "interrupt-controller@d000000" in root["children"]["soc"]["children"]
    assert "stdout-path" not in root["children"]["chosen"]["props"]


@pytest.mark.parametrize("bad, msg", [
    (dict(aia=None), "need an interrupt controller"),
    (dict(virtio_mmio=[F.VirtioMmioNode(base=0x10001000, size=0x1000, irq=97)]), "source 97"),
    (dict(virtio_mmio=[F.VirtioMmioNode(base=0x10001000, size=0x1000, irq=1),
                       F.VirtioMmioNode(base=0x10001800, size=0x1000, irq=2)]), "overlaps"),
])
def test_bad_virtio_layouts_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        _tree(**bad)


def test_guest_index_bits_written_when_there_are_guest_files():
    aia = F.AiaNodes(imsic_base=A.IMSIC_BASE, imsic_stride=A.imsic_stride(2), num_ids=63,
                     aplic_base=A.APLIC_BASE, aplic_size=A.APLIC_SIZE, num_sources=32,
                     guest_index_bits=2)
    _, root = _tree(aia=aia, virtio_mmio=())
    imsic = root["children"]["soc"]["children"]["interrupt-controller@28000000"]["props"]
    assert u32(imsic["riscv,guest-index-bits"]) == 2
    assert cells(imsic["reg"]) == [0, 0x28000000, 0, 3 * 4 * 0x1000]


def test_dtc_reads_the_aia_and_virtio_nodes(tmp_path):
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.skip("pykvm: host lacks dtc")
    blob, _ = _tree()
    p = tmp_path / "virt.dtb"
    p.write_bytes(blob)
    r = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # dtc's checks see the interrupt specifiers resolve (no interrupts_property warnings)
    assert "interrupts_property" not in r.stderr and "interrupts_extended" not in r.stderr, r.stderr
    assert "virtio,mmio" in r.stdout and "riscv,aplic" in r.stdout and "riscv,imsics" in r.stdout


def test_aia_layout_helpers():
    assert [A.index_bits(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    assert A.imsic_address(0) == 0x28000000 and A.imsic_address(3) == 0x28003000
    assert A.imsic_address(1, guest_bits=1) == 0x28002000
    with pytest.raises(ValueError):
        A.index_bits(0)


def test_no_aia_on_this_host_is_one_line(kvm):
    """The x86 host's KVM has no RISC-V AIA device: available() says so, Aia() raises
    AiaUnavailable with one line naming the device, and the virt platform asked for virtio
    devices refuses with the same line."""
    from pykvm import errors
    from pykvm.devices.virtio.rng import VirtioRng
    from pykvm.platform import riscv_virt as P
    from pykvm.platform.base import MachineControl
    with kvm.create_vm() as vm:
        assert A.available(vm.fd) is False
        with pytest.raises(A.AiaUnavailable) as e:
            A.Aia(vm.fd, 2)
        assert isinstance(e.value, errors.PykvmError)
        line = str(e.value)
        assert "\n" not in line and "KVM_DEV_TYPE_RISCV_AIA" in line and "ENODEV" in line, line
        control = MachineControl(console=lambda b: None, stopping=lambda: False,
                                 kick=lambda i: None, in_run=lambda i: False)
        rng = VirtioRng()
        try:
            with pytest.raises(A.AiaUnavailable) as e2:
                P.VirtPlatform(vm, kvm, control, vcpus=1, mem_size=2 << 20, virtio=[rng])
        finally:
            rng.close()
        msg = str(e2.value)
        assert msg.startswith("virtio devices need an interrupt controller: this host's KVM "
                              "has no in-kernel RISC-V AIA irqchip") and "\n" not in msg, msg


def test_virt_platform_refuses_bad_virtio_options():
    from pykvm.platform import riscv_virt as P
    from pykvm.platform.base import MachineControl
    control = MachineControl(console=lambda b: None, stopping=lambda: False,
                             kick=lambda i: None, in_run=lambda i: False)
    with pytest.raises(ValueError, match="VirtioDevice"):
        P.VirtPlatform(None, None, control, vcpus=1, mem_size=1 << 20, virtio=["rng"])
    with pytest.raises(ValueError, match="8 virtio-mmio slots"):
        P.VirtPlatform(None, None, control, vcpus=1, mem_size=1 << 20, virtio=[object()] * 9)
