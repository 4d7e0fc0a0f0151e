"""Tiny real-mode test guests assembled with binutils (GNU as, Intel syntax)."""
import os
import subprocess
import tempfile


def asm16(body: str) -> bytes:
    """Assemble 16-bit code (GNU as, Intel syntax) into a flat image loaded at 0x8000."""
    src = ".intel_syntax noprefix\n.code16\n.org 0\n" + body + "\n"
    with tempfile.TemporaryDirectory() as d:
        s, o, b = (os.path.join(d, n) for n in ("g.S", "g.o", "g.bin"))
        with open(s, "w") as f:
            f.write(src)
        r = subprocess.run(["as", "--32", "-o", o, s], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", o, b], check=True,
                       capture_output=True)
        with open(b, "rb") as f:
            return f.read()
