"""pykvm.runloop.ConsoleBuffer: the one console retention (last `limit` bytes, a dropped count,
bounded memory, every byte streamed), used by the run loops; and ConsoleWatch, which finds a text
in console output given in pieces (``--snapshot-at console:TEXT``, tests waiting for a line)."""
import threading

import pytest

from pykvm.runloop import ConsoleBuffer, ConsoleWatch


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


# -- ConsoleWatch: text seen in a console given in pieces ----------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_console_watch_finds_text_straddling_pieces_of_any_size(size):
    stream = b"x" * 50 + b"cpu0 count=100 sum=1" + b"y" * 30
    fired = []
    w = ConsoleWatch("cpu0 count=100 ", then=lambda: fired.append(1))
    for i in range(0, len(stream), size):
        assert w.hit.is_set() == (b"cpu0 count=100 " in stream[:i])
        w(stream[i:i + size])
    assert w.wait(0) and fired == [1]                # then() once, however often it comes
    w(b"cpu0 count=100 ")
    assert fired == [1]


def test_console_watch_misses_a_text_that_never_came_whole():
    w = ConsoleWatch(b"done")
    for piece in (b"do", b"n", b"\ne", b"don", b"", b"dome"):
        w(piece)
    assert not w.wait(0)
    w(b"do")
    w(b"ne")
    assert w.wait(0)


def test_console_watch_of_one_byte_and_its_refusals():
    w = ConsoleWatch("#")
    w(b"ab")
    assert not w.hit.is_set()
    w(b"c#")
    assert w.hit.is_set()
    with pytest.raises(ValueError):
        ConsoleWatch("")


def test_console_watch_from_several_threads_at_once():
    """vCPU threads append concurrently: each thread's text is whole in its own pieces, and the
    watch finds it whichever thread gives it."""
    w = ConsoleWatch("needle")
    start = threading.Barrier(4)

    def feed(data):
        start.wait()
        for _ in range(2000):
            w(data)
    ts = [threading.Thread(target=feed, args=(b"hay",)) for _ in range(3)]
    ts.append(threading.Thread(target=feed, args=(b"needle",)))
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert w.wait(0)


def test_console_watch_refuses_what_is_not_text_or_bytes():
    for bad in (3, None, 2.5, ["x"]):
        with pytest.raises(TypeError):
            ConsoleWatch(bad)
    with pytest.raises(TypeError):
        ConsoleWatch("x", then="not callable")
    w = ConsoleWatch(b"\0\0")
    for piece in (5, "text", None):
        with pytest.raises(TypeError):
            w(piece)
    assert not w.hit.is_set()                        # an int was never taken as NUL bytes
    w(memoryview(b"a\0\0"))
    assert w.hit.is_set()
