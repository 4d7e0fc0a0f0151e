"""The KVM device a person points pykvm at (issue 9): --device / $PYKVM_DEVICE, a permission
error that says how to get access, a non-KVM device that says so, and the same exit status
contract for every subcommand."""
import json
import os
import subprocess
import sys

import pytest

from pykvm import Kvm, status
from pykvm.errors import KvmDeviceError

pytestmark = pytest.mark.requires_kvm

PYKVM = [sys.executable, "-m", "pykvm"]


def cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(PYKVM + list(args), capture_output=True, text=True, timeout=60, env=e)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("path,words", [
    ("/dev/null", "is not a KVM device"),
    ("/etc/hostname", "is not a KVM device"),
    ("/nonexistent/kvm", "does not exist"),
])
def test_bad_devices_are_named_and_explained(path, words):
    with pytest.raises(KvmDeviceError, match=words):
        Kvm(path)
    for sub in (["caps"], ["regs"], ["run"], ["run", "--json"]):
        r = cli(*sub, "--device", path)
        assert r.returncode == status.VMM_ERROR, (sub, r.stderr)
        assert words in one_line(r.stderr)
        if "--json" in sub:
            assert json.loads(r.stdout)["exit_code"] == status.VMM_ERROR
    r = cli("caps", env={"PYKVM_DEVICE": path})
    assert r.returncode == status.VMM_ERROR and words in one_line(r.stderr)


def test_permission_error_says_how_to_get_access(tmp_path):
    if os.geteuid() == 0:
        # a private node for the same device, mode 0600, opened by an unprivileged user
        st = os.stat("/dev/kvm")
        node = tmp_path / "kvm"
        os.mknod(node, 0o600 | 0o020000, st.st_rdev)
        os.chmod(tmp_path, 0o755)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # child: drop to 'nobody' and try
            try:
                os.close(rfd)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    Kvm(str(node))
                    text = "opened"
                except Exception as e:                 # noqa: BLE001 - reported to the parent
                    text = str(e)
                os.write(wfd, text.encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            msg = f.read().decode()
        os.waitpid(pid, 0)
    else:
        f = tmp_path / "kvm"
        f.write_bytes(b"")
        f.chmod(0)
        with pytest.raises(KvmDeviceError) as ei:
            Kvm(str(f))
        msg = str(ei.value)
    assert "permission denied" in msg and "'kvm'" in msg and "usermod -aG kvm" in msg, msg


def test_device_option_reaches_every_kvm_user():
    r = cli("caps", "--json", "--device", "/dev/kvm")
    assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/dev/kvm"
    r = cli("run", "--device", "/dev/kvm")
    assert r.returncode == 0
