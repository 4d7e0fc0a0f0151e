"""virtio-pci on the pc machine, on the real /dev/kvm: a tiny guest finds virtio-rng and
virtio-blk by their PCI capabilities, negotiates, sets up queues with MSI-X vectors and reads
random bytes, writes, flushes and reads back a sector of a raw image file, asks for the disk's
serial, and gets the spec's status for requests it should not make (``virtio_pci.c``)."""
import pytest

from pykvm.devices.virtio.blk import VirtioBlk
from pykvm.devices.virtio.rng import VirtioRng

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_arch("x86_64")]

OK, IOERR, UNSUPP = 0, 1, 2


@pytest.mark.parametrize("how", ["virtio_pci", "Machine options"])
def test_rng_and_blk_over_virtio_pci(guest_vm, tmp_path, how):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * 1024))
    if how == "virtio_pci":                      # device models handed to the pc machine
        disk = VirtioBlk(str(img), serial="pykvm-disk0")
        m = guest_vm("virtio_pci.c", machine="pc", virtio_pci=[VirtioRng(), disk])
    else:                                        # what `pykvm run --disk ... --rng` asks for
        m = guest_vm("virtio_pci.c", disks=[f"{img},serial=pykvm-disk0"], rng=True)
        assert m.platform.name == "pc"
    rng_id, blk_id, caps, table, mult = m.sync(stage=1)
    assert rng_id == 0x1AF4 | 0x1044 << 16 and blk_id == 0x1AF4 | 0x1042 << 16
    assert caps & 0b111110 == 0b111110                 # common, notify, ISR, device, PCI cfg
    assert table == 2 and mult == 4
    status, lens, differ, msis = m.sync(stage=2)
    assert status & 8 and lens == 32 | 32 << 32 and differ == 1 and msis == 2
    capacity, ws, fs, rs, same, id8, blk_msis = m.sync(stage=3)
    assert capacity == 128 and (ws, fs, rs) == (OK, OK, OK) and same == 1
    assert id8.to_bytes(8, "little") == b"pykvm-di"
    assert blk_msis == 4
    sector = img.read_bytes()[512:1024]
    assert sector == bytes((i * 7 + 3) & 0xFF for i in range(512))   # in the file itself
    past, unknown, blk_status = m.sync(stage=4)
    assert past == IOERR and unknown == UNSUPP and blk_status & 4 and not blk_status & 64
    m.done()
    if how == "Machine options":
        m.close()                                # a running C worker's counts join at its stop
        counters = m.device_counters()
        assert set(counters) == {"virtio-rng0", "virtio-blk0"}, counters
        blk = counters["virtio-blk0"]
        # write, flush, read, GET_ID, one past the end, one of an unknown type
        assert blk["python_requests"] + blk["native_requests"] == 6, blk


def test_a_virtio_blk_given_twice_or_closed_is_refused_and_the_callers_stays_open(tmp_path):
    from pykvm.devices.virtio.blk import DiskError
    from pykvm.machine import Machine
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    disk = VirtioBlk(str(img))
    with pytest.raises(DiskError, match="given twice"):
        Machine("hello", disks=[disk, disk])
    assert not disk.closed                       # the caller's model is not closed on failure
    disk.close()
    with pytest.raises(DiskError, match="was closed"):
        Machine("hello", disks=[disk])


def test_a_second_writer_of_one_image_is_refused(tmp_path):
    from pykvm.devices.virtio.blk import DiskLocked
    from pykvm.machine import Machine
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    with Machine("hello", disks=[str(img)]):
        with pytest.raises(DiskLocked, match="disk.img"):
            Machine("hello", disks=[str(img)])
        with pytest.raises(DiskLocked):                 # not even read-only while written
            Machine("hello", disks=[f"{img},ro"])
    with Machine("hello", disks=[f"{img},ro"]), Machine("hello", disks=[f"{img},ro"]):
        pass                                            # readers share


@pytest.mark.parametrize("bad, match", [
    (["/nonexistent/disk.img"], "cannot open"), (["{tmp}"], "directory"),
    (["{img},bogus"], "unknown disk option"), ("{img}", "list of disk images"),
    ([42], "a disk is a path"),
])
def test_bad_disks_are_refused_in_one_line(tmp_path, bad, match):
    from pykvm.machine import Machine
    img = tmp_path / "d.img"
    img.write_bytes(bytes(512))

    def fill(v):
        return v.format(tmp=tmp_path, img=img) if isinstance(v, str) else v
    bad = fill(bad) if isinstance(bad, str) else [fill(b) for b in bad]
    with pytest.raises(ValueError, match=match) as ei:
        Machine("hello", disks=bad)
    assert "\n" not in str(ei.value)


def test_a_locked_image_is_bad_input_on_the_command_line_not_a_host_limit(tmp_path):
    import subprocess
    import sys
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "hello", "--disk", str(img),
                        "--disk", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"pykvm: {img}: failed to get write lock: the image is in use (another VM, or another "
        "disk of this one)"]


def test_run_json_and_trace_give_each_virtio_devices_counters(tmp_path):
    import json
    import subprocess
    import sys
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    base = [sys.executable, "-m", "pykvm", "run", "hello", "--disk", str(img), "--rng", "--no-input"]
    r = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60)
    devices = json.loads(r.stdout)["devices"]
    assert set(devices) == {"virtio-blk0", "virtio-rng0"} and devices["virtio-rng0"] == {}
    assert devices["virtio-blk0"]["python_requests"] == 0      # hello never touches the disk
    r = subprocess.run(base + ["--trace"], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("pykvm: virtio-")]
    assert len(lines) == 1 and lines[0].startswith("pykvm: virtio-blk0 python_requests=0 "), lines


def test_a_machine_nobody_closed_lets_go_of_its_disk_when_collected(tmp_path):
    import gc
    import weakref
    from pykvm.machine import Machine
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    m = Machine("hello", disks=[img])                  # an os.PathLike is a disk too
    m.run(timeout=10)
    gone = weakref.ref(m)
    del m
    gc.collect()
    assert gone() is None
    Machine("hello", disks=[str(img)]).close()         # the lock went with it


def test_a_comma_in_a_disk_file_name_is_written_twice(tmp_path):
    from pykvm.devices.virtio.blk import disk_from_spec
    img = tmp_path / "a,b.img"
    img.write_bytes(bytes(4096))
    d = disk_from_spec(f"{str(img).replace(',', ',,')},ro,serial=s1")
    try:
        assert (d.path, d.readonly, d.serial) == (str(img), True, "s1")
    finally:
        d.close()
