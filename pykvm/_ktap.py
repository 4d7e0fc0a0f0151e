"""KTAP text rules shared by the pytest plugin's writer (:mod:`pykvm.testing.ktap`) and the labs'
JUnit converter (:mod:`pykvm.lab.ktap_junit`); standard library only, so that neither needs the
other's dependencies (pytest)."""


def escape_name(text: str) -> str:
    """A KTAP test description for ``text``: ``#`` (which starts a directive), ``%`` and control
    characters percent-encoded as their UTF-8 bytes (Documentation/dev-tools/ktap.rst: a
    description holds no ``#``); ``%20`` for a blank one."""
    out = []
    for ch in text:
        if ch in "#%" or ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or ch in "\u2028\u2029":
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out).strip() or "%20"
