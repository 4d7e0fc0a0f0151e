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
from pykvm.errors import SnapshotError, shown


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


# -- bounds from the machine described, duplicate sections, unwritable targets, quoting ----------

def _raw_snapshot(sections):
    """A snapshot file's bytes from (name, stored bytes, flags) triples exactly as given, with
    valid CRCs and digest: what a crafter writes, where Writer refuses (e.g. a name twice)."""
    n = len(sections)
    off = snapfile._HEAD.size + n * snapfile._ENTRY.size
    table, body = b"", b""
    for name, data, flags in sections:
        table += snapfile._ENTRY.pack(name.encode(), off + len(body), len(data),
                                      zlib.crc32(data), flags)
        body += data
    out = snapfile._HEAD.pack(snapfile.MAGIC, snapfile.FORMAT_VERSION, n) + table + body
    return out + hashlib.sha256(out).digest()


def _zeros_bomb(mib):
    """A valid zlib stream of ``mib`` MiB of zeros in about a KiB per MiB, made without
    compressing them all: a fully flushed block of 1 MiB of zeros, repeated, and the
    Adler-32 of the whole (RFC 1950/1951)."""
    z = bytes(1 << 20)
    c = zlib.compressobj(9)
    first = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(z) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    adler = 1
    for _ in range(mib):
        adler = zlib.adler32(z, adler)
    return first + block * (mib - 1) + end[:-4] + adler.to_bytes(4, "big")


def test_a_section_name_may_appear_only_once(tmp_path):
    """A second 'meta' in front of the real one, or a second 'ram', is refused in one line by
    read() and parse() alike, never "the last wins"."""
    meta = zlib.compress(b'{"arch": "riscv64"}')
    for dup in ("meta", "ram"):
        blob = _raw_snapshot([(dup, meta, 1), ("meta", meta, 1), ("ram", b"r" * 100, 0)]
                             if dup == "meta" else
                             [("meta", meta, 1), ("ram", b"r" * 100, 0), ("ram", b"s", 0)])
        path = tmp_path / f"dup-{dup}.snap"
        path.write_bytes(blob)
        for reader, arg in ((snapfile.read, str(path)), (snapfile.parse, blob)):
            with pytest.raises(SnapshotError, match=f"section '{dup}' appears twice") as e:
                reader(arg)
            assert "\n" not in str(e.value)


def test_inflating_stops_as_soon_as_the_bound_is_passed():
    """A 256 MiB stream of zeros against a 4 MiB bound: refused after about the bound's worth
    of output, so the memory it costs is the bound's, not the stream's (traced allocations)."""
    import tracemalloc
    s = snapfile.Section("image", _zeros_bomb(256), True)
    tracemalloc.start()
    try:
        with pytest.raises(SnapshotError, match=r"more than the 4194304 bytes it may "
                                                r"\(the guest RAM size\)"):
            s.payload(4 << 20, "the guest RAM size")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert snapfile.Section("x", _zeros_bomb(3), True).payload(3 << 20) == bytes(3 << 20)
    with pytest.raises(SnapshotError, match="truncated or has bytes after its end"):
        snapfile.Section("x", _zeros_bomb(3)[:-10], True).payload(3 << 20)


def _meta(**change):
    """Metadata that passes restore's checks on this host, for a 64 MiB bare machine."""
    from pykvm._host import HOST_ARCH
    m = {"format": snapfile.FORMAT_VERSION, "finished_vcpus": [], "arch": HOST_ARCH, "kvm_api_version": 12, "vendor": "GenuineIntel",
         "mono_ns": 1, "taken_unix_ns": 1, "vcpus": 1, "initrds": 0, "ram": [[0, 64 << 20]],
         "image_sha256": "0" * 64, "cpuid": [[0, 0, 0, 0, 0, 0, 0]],
         "platform": {"name": "bare"},
         "config": {"mem_size": 64 << 20, "machine": "bare", "cmdline": "", "flat_addr": None,
                    "flat_mode": "real", "image_name": "g", "platform_opts": {}}}
    m.update(change)
    return m


def _snapshot_file(path, meta, image, extra=()):
    path.write_bytes(_raw_snapshot([("meta", zlib.compress(json.dumps(meta).encode()), 1),
                                    ("image", image, 1), *extra]))
    return str(path)


def test_cli_refuses_an_image_bomb_within_the_guest_ram_it_describes(tmp_path):
    """A 1.1 MB snapshot whose image inflates to 1.1 GiB, for a machine of 64 MiB: `pykvm
    restore` refuses it once 64 MiB are inflated (the loader puts the image in guest RAM),
    in one line with status 2, in a child whose address space is held to 1 GiB so that a
    reader bounded only by the 1 GiB loader limit fails here instead of eating the host."""
    import resource
    import subprocess
    import sys
    path = _snapshot_file(tmp_path / "bomb.snap", _meta(), _zeros_bomb(1100))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    p = subprocess.run([sys.executable, "-m", "pykvm", "restore", path, "--timeout", "2"],
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert ("section 'image' decompresses to more than the 67108864 bytes it may "
            "(the guest RAM size)") in p.stderr
    assert p.stdout == ""


def test_restore_bounds_every_section_by_the_machine_described(tmp_path):
    """The reader (snapshot.Plan, before any VM exists): an image larger than the RAM, an
    initrd larger than the RAM the image... leaves, and a duplicate or unknown section are
    each one line."""
    from pykvm import snapshot
    meta = _meta()
    path = _snapshot_file(tmp_path / "big.snap", meta, zlib.compress(bytes((64 << 20) + 1)))
    with pytest.raises(SnapshotError, match="'image' decompresses to more than the 67108864"):
        snapshot.Plan(path)
    image = b"\x7fELF"
    meta = _meta(initrds=2, image_sha256=hashlib.sha256(image).hexdigest())
    path = _snapshot_file(tmp_path / "rd.snap", meta, zlib.compress(image), [
        ("initrd.0", zlib.compress(bytes(40 << 20)), 1),
        ("initrd.1", zlib.compress(bytes(40 << 20)), 1)])
    with pytest.raises(SnapshotError, match=r"'initrd.1' decompresses to more than the "
                                            r"25165824 bytes it may \(the guest RAM size less"):
        snapshot.Plan(path)
    path = _snapshot_file(tmp_path / "x.snap", _meta(), _zeros_bomb(8),
                          [("zzz", b"", 0)])
    with pytest.raises(SnapshotError, match="unknown sections zzz"):
        snapshot.Plan(path)                # before the image is inflated


def test_quoted_values_are_short_and_escaped(tmp_path):
    """A value from the file is quoted in at most 60 characters with every character that
    is not printable ASCII escaped: no raw control character, no U+FFFD."""
    from pykvm import snapshot
    assert shown("x" * 1000) == "'" + "x" * 56 + "..."
    assert shown("a\x1b[2J\ufffd") == "'a\\x1b[2J\\ufffd'"
    assert snapfile.printable("says \ufffd\ufffd\x07 here") == "says \\ufffd\\ufffd\\x07 here"
    hostile = "\x1b[2J\ufffd" + "m" * 1000
    for meta in (_meta(platform={"name": hostile}),
                 _meta(config=dict(_meta()["config"], platform_opts={hostile: 1})),
                 _meta(platform={"name": "bare", hostile: 1})):
        path = _snapshot_file(tmp_path / "q.snap", meta, zlib.compress(b""))
        with pytest.raises(SnapshotError) as e:
            snapshot.Plan(path)
        line = str(e.value)
        assert "\\x1b[2J\\ufffd" in line and "m" * 61 not in line, line
        assert all(" " <= c <= "~" for c in line) and len(line) < 400, line


def test_an_unwritable_directory_is_refused_before_anything_is_written(tmp_path):
    """/proc and /sys take no new files: check_target (which `pykvm run --snapshot` calls
    before the guest starts) makes and removes the temporary file the write will make, and
    refuses in one line naming the path and the error; Writer.write does the same."""
    import os
    w = snapfile.Writer()
    w.add("a", b"data")
    for path in ("/proc/x.snap", "/sys/kernel/x.snap"):
        if not os.path.isdir(os.path.dirname(path)):
            continue
        for call in (snapfile.check_target, w.write):
            with pytest.raises(SnapshotError, match=f"cannot write the snapshot '{path}': "
                                                    "(No such file|Permission denied|"
                                                    "Read-only)") as e:
                call(path)
            assert "\n" not in str(e.value)
    snapfile.check_target(str(tmp_path / "ok.snap"))
    assert os.listdir(tmp_path) == []          # the probe leaves nothing behind


def test_an_error_while_writing_is_a_snapshot_error_naming_the_path(tmp_path):
    """A write that fails after the checks (here: the file size limit, RLIMIT_FSIZE, in a
    child, as a full disk would) is one SnapshotError line naming the path and strerror, and
    the temporary file is removed."""
    import subprocess
    import sys
    code = (
        "import resource, signal, sys\n"
        "from pykvm import snapfile\n"
        "from pykvm.errors import SnapshotError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "w = snapfile.Writer()\n"
        "w.add('a', bytes(1 << 20))\n"
        "try:\n"
        "    w.write(sys.argv[1])\n"
        "except SnapshotError as e:\n"
        "    print(type(e).__name__, e)\n")
    target = str(tmp_path / "big.snap")
    p = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True,
                       timeout=120)
    assert p.stdout == f"SnapshotError cannot write the snapshot '{target}': File too large\n", \
        p.stdout + p.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
