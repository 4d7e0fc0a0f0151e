"""pykvm.runloop.ConsoleBuffer: the one console retention (last `limit` bytes, a dropped count,
bounded memory, every byte streamed), used by the run loops."""
import threading

from pykvm.runloop import ConsoleBuffer


def test_keeps_the_last_limit_bytes_and_counts_the_rest():
    c = ConsoleBuffer(10)
    for i in range(100):
        c.append(bytes([0x30 + i % 10]))
    assert c.data == b"0123456789" and len(c) == 10
    assert c.total == 100 and c.dropped == 90


def test_memory_stays_bounded_by_twice_the_limit():
    c = ConsoleBuffer(1000)
    for _ in range(10000):
        c.append(b"x" * 7)
        assert c.held <= 2 * 1000 + 7
    assert c.dropped == 70000 - 1000


def test_every_byte_is_streamed_kept_or_not():
    seen = []
    c = ConsoleBuffer(4, on_data=seen.append)
    c.append(b"hello, ")
    c.append(bytearray(b"world"))
    c.append(b"")
    assert seen == [b"hello, ", b"world"] and all(type(s) is bytes for s in seen)
    assert c.data == b"orld" and c.dropped == 8


def test_zero_limit_keeps_nothing():
    c = ConsoleBuffer(0)
    c.append(b"abc")
    assert c.data == b"" and c.held == 0 and c.dropped == 3
    c.clear()
    assert c.total == 0 and c.dropped == 0


def test_appends_from_many_threads_lose_nothing():
    c = ConsoleBuffer(1 << 20)

    def writer(ch):
        for _ in range(2000):
            c.append(ch * 3)

    threads = [threading.Thread(target=writer, args=(bytes([0x41 + i]),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d = c.data
    assert len(d) == c.total == 4 * 2000 * 3 and c.dropped == 0
    assert all(d.count(bytes([0x41 + i])) == 6000 for i in range(4))
    assert all(d[k:k + 3] == d[k:k + 1] * 3 for k in range(0, len(d), 3))   # appends whole
