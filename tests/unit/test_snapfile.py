"""The snapshot file format (pykvm.snapfile, docs/snapshots.md) without KVM: what is written
reads back, RAM is stored sparsely, and every malformed file is one SnapshotError line before
anything is returned."""
import hashlib
import json
import zlib

import pytest

from pykvm import snapfile
from pykvm.arch.snapstate import ArchState
from pykvm.devices.snapstate import decode, encode
from pykvm.errors import SnapshotError


def _write(tmp_path, sections, name="s.snap"):
    w = snapfile.Writer()
    for n, (data, compress) in sections.items():
        w.add(n, data, compress=compress)
    path = str(tmp_path / name)
    size = w.write(path)
    return path, size


def test_sections_read_back_in_order(tmp_path):
    path, size = _write(tmp_path, {"meta": (b'{"a": 1}', True), "raw": (b"\x00\x01" * 100, False),
                                   "empty": (b"", False)})
    with open(path, "rb") as f:
        blob = f.read()
    assert len(blob) == size and blob[:8] == snapfile.MAGIC
    assert hashlib.sha256(blob[:-32]).digest() == blob[-32:]
    secs = snapfile.read(path)
    assert list(secs) == ["meta", "raw", "empty"]
    assert secs["meta"].compressed and not secs["raw"].compressed
    assert snapfile.json_section(secs, "meta") == {"a": 1}
    assert secs["raw"].payload(1000) == b"\x00\x01" * 100
    assert secs["empty"].payload(0) == b""


def test_ram_is_stored_as_runs_of_nonzero_pages():
    ram = bytearray(16 * 4096)
    ram[4096:4100] = b"abcd"                      # page 1
    ram[2 * 4096] = 1                             # page 2: one run with page 1
    ram[9 * 4096 + 4095] = 7                      # page 9
    payload = snapfile.encode_ram([(0x100000, memoryview(ram))])
    runs = snapfile.decode_ram(payload, [(0x100000, 0x100000 + len(ram))])
    assert [(g, n) for g, _, n in runs] == [(0x101000, 2 * 4096), (0x109000, 4096)]
    for gpa, off, n in runs:
        start = gpa - 0x100000
        assert payload[off:off + n] == ram[start:start + n]
    assert len(payload) == 2 * 16 + 3 * 4096      # zero pages cost nothing
    assert snapfile.encode_ram([(0, memoryview(bytes(8192)))]) == b""


@pytest.mark.parametrize("record, message", [
    (snapfile._RUN.pack(0x200000, 4096, 0) + bytes(4096), "outside guest RAM"),
    (snapfile._RUN.pack(0x100800, 4096, 0) + bytes(4096), "malformed"),
    (snapfile._RUN.pack(0x100000, 0, 0), "malformed"),
    (snapfile._RUN.pack(0x100000, 4096, 1) + bytes(4096), "malformed"),
    (snapfile._RUN.pack(0x100000, 8192, 0) + bytes(4096), "truncated"),
    (snapfile._RUN.pack(0x100000, 4096, 0)[:10], "truncated"),
    (snapfile._RUN.pack(0x101000, 4096, 0) + bytes(4096) +
     snapfile._RUN.pack(0x100000, 4096, 0) + bytes(4096), "out of order"),
    (snapfile._RUN.pack(0xFFFFFFFFFFFFF000, 0xFFFFF000, 0), "outside guest RAM|truncated"),
])
def test_a_bad_ram_record_is_refused(record, message):
    with pytest.raises(SnapshotError, match=message):
        snapfile.decode_ram(record, [(0x100000, 0x180000)])


def _blob(tmp_path):
    path, _ = _write(tmp_path, {"meta": (b'{"k": "v"}', True), "ram": (b"r" * 5000, True)})
    with open(path, "rb") as f:
        return bytearray(f.read())


def _redigest(b):
    body = bytes(b[:-32])
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "corrupted or truncated"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b"", "bad magic"),
    (lambda b: b"PYKVMSNQ" + b[8:], "bad magic"),
    (lambda b: _redigest(b[:8] + (7).to_bytes(4, "little") + b[12:]), "format version 7"),
    (lambda b: _redigest(b[:12] + (1 << 30).to_bytes(4, "little") + b[16:]), "sections, more"),
    (lambda b: _redigest(b[:12] + (100).to_bytes(4, "little") + b[16:]), "truncated"),
    (lambda b: _redigest(b[:48] + (1 << 60).to_bytes(8, "little") + b[56:]), "not where"),
    (lambda b: _redigest(b[:68] + (8).to_bytes(4, "little") + b[72:]), "unknown flags"),
    (lambda b: _redigest(b[:16] + b"\x01" + b[17:]), "malformed name"),
    (lambda b: b + b"tail", "corrupted or truncated"),
])
def test_a_malformed_file_is_one_line(tmp_path, damage, message):
    path = str(tmp_path / "bad.snap")
    with open(path, "wb") as f:
        f.write(bytes(damage(_blob(tmp_path))))
    with pytest.raises(SnapshotError, match=message) as e:
        snapfile.read(path)
    assert "\n" not in str(e.value)


def test_a_flipped_byte_names_its_section(tmp_path):
    b = _blob(tmp_path)
    off, n = snapfile._ENTRY.unpack_from(b, 16 + snapfile._ENTRY.size)[1:3]   # ram
    b[off + n // 2] ^= 1
    with pytest.raises(SnapshotError, match="section 'ram' fails its CRC-32"):
        snapfile.parse(bytes(b))
    # and a CRC that does not match with a valid digest (a writer's bug) is caught too
    with pytest.raises(SnapshotError, match="section 'ram' is corrupted"):
        snapfile.parse(_redigest(b))


def test_decompression_is_bounded(tmp_path):
    bomb = zlib.compress(bytes(10 << 20))          # 10 MiB of zeros in a few KiB
    path, _ = _write(tmp_path, {"meta": (bomb, False)})
    secs = snapfile.read(path)
    secs["meta"].compressed = True
    with pytest.raises(SnapshotError, match="decompresses to more than"):
        secs["meta"].payload(1 << 20)
    assert len(secs["meta"].payload(10 << 20)) == 10 << 20


def test_an_unreadable_path_is_one_line(tmp_path):
    with pytest.raises(SnapshotError, match="cannot read the snapshot"):
        snapfile.read(str(tmp_path / "missing.snap"))
    with pytest.raises(SnapshotError, match="not a regular file \\(a directory\\)"):
        snapfile.read(str(tmp_path))


def test_bad_json_and_missing_sections(tmp_path):
    path, _ = _write(tmp_path, {"meta": (b"{not json", True), "x": (b"\xff\xfe", False)})
    secs = snapfile.read(path)
    with pytest.raises(SnapshotError, match="not valid JSON"):
        snapfile.json_section(secs, "meta")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        snapfile.json_section(secs, "x")
    with pytest.raises(SnapshotError, match="'vm' section is missing"):
        snapfile.json_section(secs, "vm")


def test_writer_refuses_bad_names(tmp_path):
    w = snapfile.Writer()
    for bad in ("", "x" * 33, "caf\u00e9", "a\0b"):
        with pytest.raises(ValueError):
            w.add(bad, b"")
    w.add("ok", b"")
    with pytest.raises(ValueError, match="twice"):
        w.add("ok", b"")


def test_device_values_keep_their_types():
    from collections import deque
    value = {"b": b"\x00\xff", "ba": bytearray(b"ab"), "q": deque([1, 2]), "t": (1, "x"),
             "d": {1: 2, "s": None}, "n": [True, 3, "s"], "set": {3, 1}}
    back = decode(json.loads(json.dumps(encode(value))))
    assert back == value
    assert type(back["ba"]) is bytearray and type(back["q"]) is deque and type(back["t"]) is tuple
    with pytest.raises(SnapshotError):
        encode(object())
    with pytest.raises(SnapshotError, match="malformed"):
        decode({"$bytes": "!!"})


def test_arch_state_compares_and_explains():
    a = ArchState({"regs": b"\x00\x01", "msrs": b"x"}, {"nested": "none here"})
    b = ArchState({"regs": b"\x00\x02", "msrs": b"x"}, {"nested": "none here"})
    assert a != b and a == ArchState(a.blobs, a.absent)
    assert a.differences(b) == {"regs": "differs from byte 0x1 (0x01 != 0x02)"}
    assert list(a) == ["regs", "msrs"] and a.size() == 3


# -- hostile paths and files (docs/snapshots.md, "What restore trusts") -----------------------

def test_the_writer_never_follows_a_planted_link_nor_replaces_a_special_file(tmp_path):
    """Another user may plant a link at any name in a shared directory: the temporary file
    is created O_EXCL|O_NOFOLLOW under a random name, so the victim stays untouched; a FIFO
    or a directory as the target is refused, not replaced."""
    import os
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "s.snap"
    for pid in range(os.getpid() - 2, os.getpid() + 3):     # the names the old writer used
        os.symlink(victim, f"{path}.tmp{pid}")
    w = snapfile.Writer()
    w.add("a", b"data")
    w.write(str(path))
    assert victim.read_bytes() == b"precious"
    assert snapfile.read(str(path))["a"].data == b"data"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pykvm-snap-")]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, kind in ((fifo, "not a regular file"), (tmp_path, "not a regular file"),
                         (tmp_path / "nodir" / "x.snap", "no directory"), ("", "bad snapshot path")):
        with pytest.raises(SnapshotError, match=kind) as e:
            w.write(str(target))
        assert "\n" not in str(e.value)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    with pytest.raises(SnapshotError, match="str or os.PathLike"):
        w.write(3)


def test_a_non_regular_snapshot_path_is_refused_without_blocking(tmp_path):
    """A FIFO with no writer would block a plain open() for ever: read() opens with
    O_NONBLOCK and refuses anything but a regular file, saying what it is."""
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory"), ("/dev/zero", "a device")):
        with pytest.raises(SnapshotError, match=f"not a regular file \\({kind}\\)"):
            snapfile.read(str(path))
    with pytest.raises(SnapshotError, match="str or os.PathLike"):
        snapfile.read(3)


def test_a_huge_file_is_refused_from_its_header_without_reading_it(tmp_path):
    """The fixed header is checked first and the digest is streamed: a 4 GiB sparse file of
    zeros, or one whose header is right but whose body is 512 MiB of zeros (refused from its
    section table, before the digest is computed), costs no memory."""
    import resource
    zeros = tmp_path / "zeros.snap"
    with open(zeros, "wb") as f:
        f.truncate(4 << 30)
    good, _ = _write(tmp_path, {"a": (b"x", False)})
    with open(good, "rb") as f:
        head = f.read(snapfile._HEAD.size + snapfile._ENTRY.size)
    padded = tmp_path / "padded.snap"
    with open(padded, "wb") as f:
        f.write(head)
        f.truncate(512 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SnapshotError, match="bad magic"):
        snapfile.read(str(zeros))
    with pytest.raises(SnapshotError, match="bytes after the last section"):
        snapfile.read(str(padded))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10, grown_kib


def test_json_nested_too_deeply_or_with_constants_is_one_line(tmp_path):
    deep = b"[" * 200000 + b"]" * 200000
    path, _ = _write(tmp_path, {"d": (deep, True), "n": (b'{"x": NaN}', False)})
    secs = snapfile.read(path)
    with pytest.raises(SnapshotError, match="nested too deeply"):
        snapfile.json_section(secs, "d")
    with pytest.raises(SnapshotError, match="NaN is not JSON"):
        snapfile.json_section(secs, "n")


@pytest.mark.parametrize("model, field, value, message", [
    ("cmos_rtc.CmosRtc", "index", 200, "index is 200, not 0-127"),
    ("i8042.I8042", "scancode_set", 9, "scancode_set is 9, not 1-3"),
    ("i8042.I8042", "kbd", {"$deque": [1] * 17}, "kbd holds 17 items, more than 16"),
    ("port92.Port92", "value", 256, "value is 256, not 0-255"),
    ("cmos_rtc.CmosRtc", "cmos", {"$bytearray": "AAAA"}, "cmos is 3 bytes, not 128"),
])
def test_device_fields_are_range_checked_before_any_is_set(model, field, value, message):
    """Each device model's restore_state() range-checks the registers and indices it
    loads (its SNAPSHOT_RANGES / SNAPSHOT_LENGTHS, bytes lengths), and sets nothing when
    one is out of range."""
    import importlib
    mod, cls = model.split(".")
    dev = getattr(importlib.import_module(f"pykvm.devices.{mod}"), cls)()
    state = dev.snapshot_state()
    before = json.dumps(state, sort_keys=True)
    state[field] = value
    with pytest.raises(SnapshotError, match=message):
        dev.restore_state(state)
    assert json.dumps(dev.snapshot_state(), sort_keys=True) == before
