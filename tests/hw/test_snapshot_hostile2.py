"""Crafted snapshot files, second round (docs/snapshots.md "What restore trusts"), on real KVM.

Each file here is well formed (valid CRCs and digest) and lies in its metadata: about the
vCPUs that finished (``finished_vcpus`` holding lists, objects, mixed types), or about its
format (the header's version and ``meta.format`` disagreeing; a version 2 file without the
``finished_vcpus`` that version always writes; a version 1 file with it). Each is refused
with one SnapshotError line by Machine.restore, and by ``pykvm restore`` with one line and
status 2, never a TypeError from deep inside the checks (as ``[[1]]`` had given: "internal
error: TypeError: unhashable type: 'list'") nor a guess at which format's rules apply."""
import hashlib
import json
import subprocess
import sys

import pytest

from pykvm import snapfile
from pykvm.errors import InvalidArgument, SnapshotError
from pykvm.machine import Machine

pytestmark = pytest.mark.requires_kvm


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    """A snapshot of the 2-vCPU snap_counter guest between runs (its first run ended by a
    short deadline: the guest has not finished)."""
    path = str(tmp_path_factory.mktemp("hostile2") / "good.snap")
    with Machine("snap_counter", vcpus=2) as m:
        m.set_params(0, 200, 0)             # slowed down: 20 ms do not finish it
        r = m.run(timeout=0.02)
        assert r.exit == "timeout", r.detail
        m.snapshot(path)
    return path


def _craft(src, dst, change_meta, version=None):
    """``src`` rewritten to ``dst`` with ``change_meta(meta dict)`` applied and, where given,
    the header's format ``version``; CRCs and digest valid, as a crafter would make it."""
    secs = snapfile.read(src)
    payloads = {n: s.payload(1 << 30) for n, s in secs.items()}
    meta = json.loads(payloads["meta"])
    change_meta(meta)
    payloads["meta"] = json.dumps(meta).encode()
    w = snapfile.Writer()
    for n, data in payloads.items():
        w.add(n, data, compress=True)
    w.write(dst)
    if version is not None:
        with open(dst, "rb") as f:
            b = bytearray(f.read())
        b[8:12] = version.to_bytes(4, "little")
        body = bytes(b[:-snapfile.DIGEST_LEN])
        with open(dst, "wb") as f:
            f.write(body + hashlib.sha256(body).digest())
    return dst


def _refused_everywhere(path, match):
    with pytest.raises(SnapshotError, match=match) as e:
        Machine.restore(path).close()
    assert "\n" not in str(e.value)
    p = subprocess.run([sys.executable, "-m", "pykvm", "restore", path, "--timeout", "30"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr and "internal error" not in p.stderr, \
        p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("value", [[[1]], [{}], [0, "1"], [None], [[0, 1]], [0.0]],
                         ids=["nested-list", "object", "mixed", "null", "pair", "float"])
def test_finished_vcpus_of_unhashable_or_mixed_values_is_one_line(snap, tmp_path, value):
    path = _craft(snap, str(tmp_path / "f.snap"), lambda m: m.update(finished_vcpus=value))
    _refused_everywhere(path, "metadata field 'finished_vcpus' is missing or malformed")


@pytest.mark.parametrize("fmt", [1, 3, "2", None, 2.0, True])
def test_meta_format_must_be_the_headers_version(snap, tmp_path, fmt):
    """A version 2 header with ``meta.format`` anything but the integer 2 (had been
    accepted: no reader looked at it)."""
    path = _craft(snap, str(tmp_path / "fmt.snap"), lambda m: m.update(format=fmt))
    _refused_everywhere(path, "metadata field 'format' is .*header says format version 2")


def test_a_version_2_file_without_finished_vcpus_is_refused(snap, tmp_path):
    """Version 2 always writes ``finished_vcpus``; without it the file had been read as "none
    finished", and a vCPU past its DONE report would be resumed."""
    path = _craft(snap, str(tmp_path / "v2.snap"), lambda m: m.pop("finished_vcpus"))
    _refused_everywhere(path, "metadata field 'finished_vcpus' is missing or malformed")


def test_a_version_1_header_with_version_2_metadata_is_refused(snap, tmp_path):
    """A version 1 header over version 2 metadata (``format`` 2, or ``format`` 1 with a
    ``finished_vcpus`` no version 1 writer makes) is refused, not read by either rule."""
    path = _craft(snap, str(tmp_path / "a.snap"), lambda m: None, version=1)
    _refused_everywhere(path, "metadata field 'format' is 2, the file's header says format "
                              "version 1")
    path = _craft(snap, str(tmp_path / "b.snap"), lambda m: m.update(format=1), version=1)
    _refused_everywhere(path, "'finished_vcpus' in a format version 1 file")


def test_a_true_version_1_file_restores_and_parse_reads_it(snap, tmp_path):
    """A genuine version 1 file (header 1, ``format`` 1, no ``finished_vcpus``) restores;
    snapfile.parse reads the versions snapfile.read reads (it had refused version 1)."""
    path = _craft(snap, str(tmp_path / "v1.snap"),
                  lambda m: (m.pop("finished_vcpus"), m.update(format=1)), version=1)
    assert snapfile.read(path).version == 1
    with open(path, "rb") as f:
        secs = snapfile.parse(f.read())
    assert secs.version == 1 and "meta" in secs
    with Machine.restore(path) as m:
        assert m.finished_vcpus == set()
        r = m.run(timeout=120)
    assert r.exit == "done", r.detail
    assert {ln for ln in r.console_text.splitlines() if ln.endswith(" done")} == \
        {"snap cpu0 done", "snap cpu1 done"}


@pytest.mark.parametrize("overrides, match", [
    ({"vcpus": 4}, "cannot override vcpus"),
    ({"kvm": "/dev/kvm"}, "kvm must be a pykvm.kvm.Kvm or None, not str"),
    ({"vm_setup": 5}, "vm_setup must be callable or None, not int"),
])
def test_restore_overrides_are_typed_errors(snap, overrides, match):
    """An override restore() does not take, or of the wrong type, is InvalidArgument naming
    it (had been a bare ValueError, and for kvm an AttributeError from the host check)."""
    with pytest.raises(InvalidArgument, match=match):
        Machine.restore(snap, **overrides).close()


def _lines(text, cpu):
    return [ln for ln in text.splitlines() if ln.startswith(f"snap cpu{cpu} ")]


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("op", ["snapshot", "checkpoint", "reset"])
def test_snapshot_checkpoint_reset_from_a_console_callback_of_a_run(tmp_path, op, vcpus):
    """Machine.snapshot(), checkpoint() and reset() called from a console callback (a run's
    vCPU thread: its vCPU is out of KVM_RUN there) had waited for that vCPU to pause, which
    it could not while the callback ran: Busy ("did not pause within 10 s"). They now count
    it as held, as they do for a step's own thread; the snapshot restores to exactly the
    lines an uninterrupted run prints after it. One vCPU too: run() runs it in the calling
    thread itself, not in a vCPU thread of its own."""
    from pykvm.runloop import ConsoleWatch
    with Machine("snap_counter", vcpus=vcpus) as m:
        full = m.run(timeout=120).console_text
    path = str(tmp_path / "cb.snap")
    outcome = []

    def then():
        try:
            if op == "snapshot":
                m2.snapshot(path)
            elif op == "checkpoint":
                m2.checkpoint()
            else:
                m2.reset()
            outcome.append("ok")
        except Exception as e:  # noqa: BLE001 — recorded, asserted below
            outcome.append(repr(e))

    m2 = Machine("snap_counter", vcpus=vcpus,
                 on_console=ConsoleWatch("cpu0 count=100 ", then=then))
    with m2:
        m2.set_params(0, 0, vcpus)
        r = m2.run(timeout=120)
    assert outcome == ["ok"], outcome
    assert r.exit == "done", r.detail
    if op == "snapshot":
        with Machine.restore(path) as m3:
            after = m3.run(timeout=120).console_text
        for cpu in range(vcpus):
            tail = _lines(after, cpu)
            assert tail and _lines(full, cpu)[-len(tail):] == tail


def test_a_reset_loop_in_one_thread_does_not_starve_a_snapshot_in_another(tmp_path):
    """One thread resets the machine in a tight loop (checkpoint/reset around tests, as the
    fresh_vm fixture does), another snapshots it: Machine.holding() lets blocks begin in
    arrival order, so each snapshot gets its turn. The reset loop had re-taken the machine
    each time before the waiting snapshot woke, until the snapshot's 10 s were spent
    ("did not pause within 10 s")."""
    import threading
    with Machine("snap_counter", vcpus=2) as m:
        m.set_params(0, 200, 0)
        assert m.run(timeout=0.02).exit == "timeout"
        m.checkpoint()
        stop = threading.Event()
        resets = []

        def loop():
            while not stop.is_set():
                resets.append(m.reset())

        t = threading.Thread(target=loop)
        t.start()
        try:
            for i in range(5):
                assert m.snapshot(str(tmp_path / f"s{i}.snap")) > 0
        finally:
            stop.set()
            t.join(60)
        assert len(resets) >= 5
    with Machine.restore(str(tmp_path / "s4.snap")) as m2:
        assert m2.run(timeout=120).exit == "done"
