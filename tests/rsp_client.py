"""A raw GDB remote-serial-protocol client for the gdb stub's hardware tests
(tests/hw/test_gdb.py, tests/hw/test_gdb_hostile2.py): frames a packet, takes the ack, reads
and acks one reply, checking its checksum (GDB RSP, "Overview")."""
import socket

from pykvm.gdbstub import packets as pk


class Raw:
    """A raw RSP client: send one packet, read one reply (acks handled). ``where``: a TCP
    port on localhost or a unix socket path."""

    def __init__(self, where):
        if isinstance(where, int):
            self.s = socket.create_connection(("127.0.0.1", where), timeout=60)
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as gdb does
        else:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(60)
            self.s.connect(where)
        self.buf = b""

    def send_raw(self, data):
        self.s.sendall(data)

    def _read_more(self):
        chunk = self.s.recv(65536)
        if not chunk:
            raise EOFError("the stub closed the connection")
        self.buf += chunk

    def read_byte(self):
        while not self.buf:
            self._read_more()
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def ack(self):
        """Take the stub's ack of the packet just sent: the next byte must be ``+``."""
        b = self.read_byte()
        assert b == b"+", b + self.buf[:40]

    def reply(self):
        while True:
            i = self.buf.find(b"$")
            if i >= 0:
                j = self.buf.find(b"#", i)
                if j >= 0 and len(self.buf) >= j + 3:
                    payload = self.buf[i + 1:j]
                    assert int(self.buf[j + 1:j + 3], 16) == pk.checksum(payload)
                    self.buf = self.buf[j + 3:]
                    self.s.sendall(b"+")
                    return payload
            self._read_more()

    def ask(self, payload):
        self.s.sendall(pk.frame(payload))
        self.ack()
        return self.reply()

    def close(self):
        self.s.close()
