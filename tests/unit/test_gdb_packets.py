"""The GDB stub's packet layer (pykvm/gdbstub/packets.py) and address parsing, no KVM: framing,
checksums, escapes, run-length decoding, the interrupt byte, and what a hostile or confused
client sends — bad checksums, garbage, packets past the size limit, bad hex, huge lengths."""
import pytest

from pykvm.gdbstub import packets as pk
from pykvm.gdbstub.server import GdbAddressError, parse_address


def _events(data, **kw):
    return [(e.kind, e.data) for e in pk.PacketReader(**kw).feed_all(data)]


def test_checksum_and_frame_match_the_manuals_example():
    # "$qSupported#37" is what gdb sends first; the sum of the payload's bytes mod 256
    assert pk.checksum(b"qSupported") == 0x37
    assert pk.frame(b"OK") == b"$OK#9a"
    assert pk.frame(b"") == b"$#00"


def test_a_good_packet_and_the_control_bytes():
    assert _events(b"+$g#67-\x03") == [("ack", b""), ("packet", b"g"), ("nak", b""),
                                       ("interrupt", b"")]


def test_checksum_digits_in_either_case():
    assert _events(b"$OK#9A") == [("packet", b"OK")]


def test_a_packet_split_across_reads_is_joined():
    r = pk.PacketReader()
    assert r.feed_all(b"$m10") == []
    assert r.feed_all(b"00,4#") == []
    assert [(e.kind, e.data) for e in r.feed_all(b"8e")] == [("packet", b"m1000,4")]


def test_bad_checksum_is_bad_and_the_next_packet_is_still_read():
    assert _events(b"$g#00$g#67") == [("bad", b"checksum mismatch"), ("packet", b"g")]


@pytest.mark.parametrize("cs", [b"zz", b" 6", b"+7", b"\xff\xfe"])
def test_unreadable_checksum_is_bad(cs):
    assert _events(b"$g#" + cs)[0][0] == "bad"


def test_garbage_between_packets_is_counted_and_ignored():
    r = pk.PacketReader()
    evs = r.feed_all(b"hello\x00\xff$g#67")
    assert [(e.kind, e.data) for e in evs] == [("packet", b"g")]
    assert r.garbage == 7


def test_a_dollar_inside_a_packet_starts_a_new_one():
    assert _events(b"$abc$g#67") == [("packet", b"g")]


def test_an_overlong_packet_is_dropped_as_it_comes_and_reported_bad():
    r = pk.PacketReader(max_packet=64)
    evs = r.feed_all(b"$" + b"A" * 10_000)
    assert evs == []
    assert len(r._buf) <= 64                     # never buffered whole
    evs = r.feed_all(b"#00$g#67")
    assert [(e.kind, e.data) for e in evs] == [("bad", b"too long"), ("packet", b"g")]


def test_escape_round_trip_of_every_byte():
    data = bytes(range(256)) * 2
    esc = pk.escape(data)
    assert not set(esc) & {ord("#"), ord("$"), ord("*")}
    assert pk.unescape(esc) == data
    assert pk.escape(b"}") == b"}]"


def test_unescape_refuses_a_dangling_escape():
    with pytest.raises(pk.PacketError):
        pk.unescape(b"ab}")


def test_rle_decode():
    # "0* " is '0' and 3 more (' ' is 32 = 29 + 3)
    assert pk.rle_decode(b"0* ") == b"0000"
    assert pk.rle_decode(b"ab*\"c") == b"abbbbbbc"      # '"' = 34: 5 more
    assert pk.rle_decode(b"plain") == b"plain"


@pytest.mark.parametrize("bad", [b"*A", b"a*", b"a*\x1f"])
def test_rle_decode_refuses_malformed_runs(bad):
    with pytest.raises(pk.PacketError):
        pk.rle_decode(bad)


def test_rle_decode_output_is_bounded():
    with pytest.raises(pk.PacketError):
        pk.rle_decode(b"a" + b"*~" * 1000, limit=1000)


def test_hex_numbers():
    assert pk.parse_hex(b"ffffffffffffffff") == (1 << 64) - 1
    assert pk.parse_signed_hex(b"-1") == -1
    for bad in (b"", b"12345678901234567", b"0x10", b"1_0", b" 1", b"-2", b"g"):
        with pytest.raises(pk.PacketError):
            pk.parse_hex(bad) if bad != b"-2" else pk.parse_signed_hex(bad)


def test_hex_data():
    assert pk.hex_decode(b"00ff7F") == b"\x00\xff\x7f"
    assert pk.hex_encode(b"\x00\xff") == b"00ff"
    for bad in (b"0", b"zz", b"0 ", b"\xff\xff"):
        with pytest.raises(pk.PacketError):
            pk.hex_decode(bad)


def test_memory_lengths_are_capped():
    assert pk.parse_addr_len(b"1000,10") == (0x1000, 0x10)
    assert pk.parse_addr_len(b"0,%x" % pk.MAX_MEMORY) == (0, pk.MAX_MEMORY)
    for bad in (b"1000", b"1000,", b",4", b"1000,%x" % (pk.MAX_MEMORY + 1),
                b"1000,ffffffffffffffff", b"1000,4,5"):
        with pytest.raises(pk.PacketError):
            pk.parse_addr_len(bad)


@pytest.mark.parametrize("text, want", [
    ("tcp::1234", ("tcp", ("127.0.0.1", 1234))),
    ("tcp:0.0.0.0:0", ("tcp", ("0.0.0.0", 0))),
    ("tcp:[::1]:99", ("tcp", ("::1", 99))),
    ("unix:/tmp/x.sock", ("unix", "/tmp/x.sock")),
])
def test_addresses(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("bad", ["", "1234", ":1234", "tcp:", "tcp::", "tcp::x", "tcp::65536",
                                 "tcp::-1", "udp::1", "unix:", "unix:a\0b", None])
def test_bad_addresses_are_refused_with_one_line(bad):
    with pytest.raises(GdbAddressError) as e:
        parse_address(bad)
    assert "\n" not in str(e.value)
