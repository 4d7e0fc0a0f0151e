"""The control socket's protocol without a VM (issue 20, items 4 and 6): request parsing and
validation, line framing with its size cap, VM names, and the socket directory's safety checks
(pykvm.control; the socket itself, on real KVM, is in tests/hw/test_control_socket.py)."""
import json
import os
import subprocess
import sys

import pytest

from pykvm import control
from pykvm.control import (COMMANDS, ControlError, LineFramer, NoSuchVm, RequestError,
                           check_name, control_directory, parse_request, validate_request)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_parses(cmd):
    assert parse_request(json.dumps({"cmd": cmd}).encode()) == {"cmd": cmd}
    req = parse_request(json.dumps({"cmd": cmd, "id": [1, "x"]}).encode())
    assert req["id"] == [1, "x"]


@pytest.mark.parametrize("line, code", [
    (b"", "bad_json"),
    (b"garbage", "bad_json"),
    (b"{\"cmd\": \"pause\"", "bad_json"),
    (b"\xff\xfe{}", "bad_json"),                             # not UTF-8
    (b"[" * 100000 + b"]" * 100000, "bad_json"),             # nested past the parser's depth
    (b"1" * 5000, "bad_json"),                               # past Python's int digit limit
    (b"NaN", "bad_json"),                                    # not JSON (RFC 8259)
    (b"{\"cmd\": \"status\", \"id\": NaN}", "bad_json"),
    (b"{\"cmd\": \"status\", \"id\": -Infinity}", "bad_json"),
    (b"{\"cmd\": \"status\", \"id\": 1e999999}", "bad_json"),     # past a double: inf
    (b"{\"cmd\": \"status\", \"cmd\": \"stop\"}", "bad_json"),  # which one? neither

    (b"[\"pause\"]", "not_object"),
    (b"\"pause\"", "not_object"),
    (b"null", "not_object"),
    (b"{}", "bad_request"),
    (b"{\"cmd\": 1}", "bad_request"),
    (b"{\"cmd\": null}", "bad_request"),
    (b"{\"cmd\": [\"pause\"]}", "bad_request"),
    (b"{\"cmd\": \"pause\", \"force\": true}", "bad_request"),
    (b"{\"cmd\": \"PAUSE\"}", "unknown_cmd"),
    (b"{\"cmd\": \"rm -rf /\"}", "unknown_cmd"),
    (b"{\"cmd\": \"" + b"x" * 60000 + b"\"}", "unknown_cmd"),
])
def test_bad_requests_are_refused_with_their_code_in_one_short_line(line, code):
    with pytest.raises(RequestError) as e:
        parse_request(line)
    assert e.value.code == code
    msg = str(e.value)
    assert "\n" not in msg and 0 < len(msg) <= 300


def test_unknown_command_lists_the_commands():
    with pytest.raises(RequestError, match="commands: status, pause, resume, stop, stat"):
        validate_request({"cmd": "fly"})


def test_framer_cuts_lines_across_chunks_in_order():
    f = LineFramer(16)
    assert f.feed(b"ab") == ([], False)
    assert f.feed(b"c\nde\n\nf") == ([b"abc", b"de", b""], False)
    assert f.feed(b"g\n") == ([b"fg"], False)
    assert f.buf == b""


def test_framer_refuses_a_line_over_the_cap_complete_or_not():
    f = LineFramer(8)
    assert f.feed(b"12345678\n") == ([b"12345678"], False)       # exactly the cap: fine
    assert f.feed(b"ok\n123456789") == ([b"ok"], True)          # 9 bytes, no newline yet
    assert f.buf == b""
    g = LineFramer(8)
    assert g.feed(b"a\n" + b"x" * 20 + b"\nb\n") == ([b"a"], True)   # nothing after it is read
    assert g.buf == b""


def test_framer_holds_at_most_the_cap_of_an_unfinished_line():
    f = LineFramer(control.MAX_LINE)
    for _ in range(64):
        lines, too_long = f.feed(b"y" * 1024)
        assert lines == [] and not too_long
    assert len(f.buf) == control.MAX_LINE
    assert f.feed(b"y") == ([], True)


@pytest.mark.parametrize("name", ["a", "web-1", "guest-123", "A.b_c", "x" * 64])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".hidden", "a/b", "../x", "a b", "x" * 65, "é",
                                  "a\nb", "a\0b", None, 7])
def test_bad_names_are_one_line(name):
    with pytest.raises(ControlError) as e:
        check_name(name)
    assert "\n" not in str(e.value) and "bad VM name" in str(e.value)


def test_directory_is_made_owner_only(tmp_path):
    d = str(tmp_path / "ctl")
    assert control_directory(d) == d
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert control_directory(d) == d                         # an existing one is fine too
    assert control.socket_path("vm1", d) == os.path.join(d, "vm1.sock")


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701, 0o777, 0o1777])
def test_directory_others_may_use_is_refused(tmp_path, mode):
    d = tmp_path / "ctl"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(ControlError, match="others may use it; refusing it: choose a "
                       "directory of your own") as e:
        control_directory(str(d))
    assert "chmod" not in str(e.value)          # never advice to open up or lock a shared dir


def test_shared_control_dir_from_environment_is_refused_without_chmod_advice():
    """PYKVM_CONTROL_DIR=/tmp (root's, mode 1777, or another user's): the real CLI refuses it
    in one line, advising another directory, never a chmod of the shared one."""
    env = dict(os.environ, PYKVM_CONTROL_DIR="/tmp")
    r = subprocess.run([sys.executable, "-m", "pykvm", "list"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "refusing it" in lines[0] and "unset PYKVM_CONTROL_DIR" in lines[0]
    assert "chmod" not in lines[0]


def test_symlinked_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ControlError, match="not a directory"):
        control_directory(str(link))


def test_a_file_in_place_of_the_directory_is_refused(tmp_path):
    f = tmp_path / "ctl"
    f.write_text("x")
    with pytest.raises(ControlError, match="not a directory"):
        control_directory(str(f))


def test_directory_of_another_user_is_refused(tmp_path):
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    if os.geteuid() == 0:                        # root can give it away: then it is refused
        os.chown(d, 65534, 65534)
        with pytest.raises(ControlError, match="belongs to uid 65534, not to you"):
            control_directory(str(d))
    else:                                        # others' directories exist everywhere: /
        with pytest.raises(ControlError, match="belongs to uid 0, not to you"):
            control_directory("/", create=False)


def test_missing_directory_when_asking_is_no_such_vm(tmp_path):
    with pytest.raises(NoSuchVm):
        control_directory(str(tmp_path / "none"), create=False)
    assert control.list_vms(str(tmp_path / "none")) == []


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("PYKVM_CONTROL_DIR", str(tmp_path / "x"))
    assert control.default_directory() == str(tmp_path / "x")
    monkeypatch.delenv("PYKVM_CONTROL_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert control.default_directory() == str(tmp_path / "pykvm")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert control.default_directory() == f"/tmp/pykvm-{os.geteuid()}"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert control.default_directory() == f"/tmp/pykvm-{os.geteuid()}"
    assert control.default_name() == f"guest-{os.getpid()}"


def test_every_reply_to_a_parsed_request_is_strict_json():
    """Whatever id a request carries, parse_request only lets through values a reply can
    carry as RFC 8259 JSON (json.dumps with allow_nan=False does not raise)."""
    for line in (b'{"cmd": "status", "id": 1.5e308}', b'{"cmd": "status", "id": -0.0}',
                 b'{"cmd": "status", "id": ' + b"9" * 4000 + b'}'):
        req = parse_request(line)
        json.dumps(req, allow_nan=False)
