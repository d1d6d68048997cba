"""core/capture.py: reading Frame Streams capture files, clean, gzipped and damaged."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.batches import FrameBatch
from core.capture import CaptureDamage, open_capture, read_frames
from core.framestream import START, STOP, encode_control, encode_data, encode_stream

CAPTURES = Path(__file__).resolve().parent / "data" / "captures"
S = len(encode_control(START, (b"protobuf:dnstap.Dnstap",)))  # 42 bytes
STOP_LEN = len(encode_control(STOP))
NAMES = ["unbound-tcp.fstrm", "unbound-unix.fstrm", "named.fstrm"]


def frames_and_bounds(data: bytes) -> tuple[list[bytes], list[int]]:
    """An independent walk of a valid capture: its payloads and the offset
    where each frame (control or data) starts, plus the end."""
    payloads, bounds, pos = [], [], 0
    while pos < len(data):
        bounds.append(pos)
        (length,) = struct.unpack_from(">I", data, pos)
        if length:
            payloads.append(data[pos + 4 : pos + 4 + length])
            pos += 4 + length
        else:
            (clen,) = struct.unpack_from(">I", data, pos + 4)
            pos += 8 + clen
    bounds.append(pos)
    return payloads, bounds


def read_all(data_or_path, name="mem", batch_size=512):
    if isinstance(data_or_path, Path):
        with open_capture(str(data_or_path)) as fh:
            reader = read_frames(fh, name, batch_size=batch_size)
            batches = list(reader)
    else:
        reader = read_frames(data_or_path, name, batch_size=batch_size)
        batches = list(reader)
    return batches, reader


@pytest.mark.parametrize("name", NAMES)
def test_real_captures_read_clean(name):
    data = (CAPTURES / name).read_bytes()
    expected, _ = frames_and_bounds(data)
    batches, reader = read_all(CAPTURES / name, name)
    assert reader.clean and reader.damage is None
    assert [f for b in batches for f in b] == expected
    assert reader.frames == len(expected) and reader.offset == len(data)
    assert all(isinstance(b, FrameBatch) and 1 <= len(b) <= 512 for b in batches)
    if name.startswith("unbound"):
        assert len(expected) == 2006


def test_batch_size_bounds_batches():
    batches, reader = read_all(CAPTURES / "named.fstrm", batch_size=7)
    assert [len(b) for b in batches] == [7] * 14 + [2]
    assert reader.clean


def test_gzip_detected_by_magic_not_name(tmp_path):
    data = (CAPTURES / "unbound-tcp.fstrm").read_bytes()
    expected, _ = frames_and_bounds(data)
    odd = tmp_path / "capture.bin"  # no .gz suffix
    odd.write_bytes(gzip.compress(data))
    batches, reader = read_all(odd)
    assert reader.clean and [f for b in batches for f in b] == expected
    # ... and a plain file named .gz is read as plain
    plain = tmp_path / "plain.fstrm.gz"
    plain.write_bytes(data)
    batches, reader = read_all(plain)
    assert reader.clean and sum(map(len, batches)) == len(expected)


def test_truncated_gzip_keeps_the_frames_decompressed(tmp_path):
    data = (CAPTURES / "unbound-tcp.fstrm").read_bytes()
    expected, bounds = frames_and_bounds(data)
    packed = gzip.compress(data)
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])
    batches, reader = read_all(path, "cut.gz")
    got = [f for b in batches for f in b]
    assert reader.damage is not None and reader.damage.path == "cut.gz"
    assert 0 < len(got) < len(expected) and got == expected[: len(got)]
    # the offset is where the first frame not read starts, in uncompressed bytes
    assert reader.damage.offset == bounds[len(got) + 1]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("size", [0, 1, 3, 4, 100_000])
def test_peek_then_read_gives_every_byte_once(tmp_path, compress, size):
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    path = tmp_path / "f"
    # Two gzip members: the peek may straddle their boundary.
    path.write_bytes(gzip.compress(data[:2]) + gzip.compress(data[2:]) if compress else data)
    with open_capture(str(path)) as stream:
        assert stream.peek(4)[:4] == data[:4]
        assert stream.peek(4)[:4] == data[:4]
        got = b""
        while chunk := stream.read(3 if len(got) < 10 else 65536):
            got += chunk
    assert got == data


def test_corrupted_gzip_reports_damage(tmp_path):
    packed = bytearray(gzip.compress((CAPTURES / "named.fstrm").read_bytes()))
    for i in range(20, len(packed) - 20, 7):
        packed[i] ^= 0x55
    path = tmp_path / "bad.gz"
    path.write_bytes(bytes(packed))
    _, reader = read_all(path, "bad.gz")
    assert reader.damage is not None and not reader.clean


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=0, max_value=12093), batch_size=st.sampled_from([1, 3, 512]))
def test_any_truncation_yields_complete_frames_and_a_damage_offset(cut, batch_size):
    data = (CAPTURES / "named.fstrm").read_bytes()
    expected, bounds = frames_and_bounds(data)
    batches, reader = read_all(data[:cut], "named.fstrm", batch_size=batch_size)
    got = [f for b in batches for f in b]
    # frames whose last byte is before the cut: bounds[i + 1] is the end of data frame i
    complete = [p for i, p in enumerate(expected) if bounds[i + 2] <= cut]
    assert got == complete
    assert isinstance(reader.damage, CaptureDamage) and not reader.clean
    assert reader.damage.path == "named.fstrm"
    # the start of the frame the cut falls in (or the cut itself, at a boundary)
    assert reader.damage.offset == max(b for b in bounds if b <= cut)


def test_truncated_in_a_frame_names_the_offset():
    data = (CAPTURES / "named.fstrm").read_bytes()
    _, bounds = frames_and_bounds(data)
    batches, reader = read_all(data[: bounds[51] + 10])
    assert sum(map(len, batches)) == 50
    assert reader.damage.offset == bounds[51]
    assert "truncated frame" in reader.damage.reason


def test_missing_stop_at_a_frame_boundary():
    data = (CAPTURES / "named.fstrm").read_bytes()
    _, bounds = frames_and_bounds(data)
    batches, reader = read_all(data[: bounds[-2]])  # everything but STOP
    assert sum(map(len, batches)) == 100
    assert reader.damage.offset == bounds[-2] and "missing STOP" in reader.damage.reason


@pytest.mark.parametrize(
    "data, offset, reason",
    [
        (b"", 0, "missing START"),
        (encode_data(b"abc") + encode_control(STOP), 0, "missing START"),
        (encode_control(START, (b"protobuf:other.Type",)) + encode_data(b"x"), 0, "wrong content type"),
        (encode_control(START, (b"protobuf:dnstap.Dnstap",)) + encode_control(START), S, "unexpected START"),
        (encode_stream([b"a", b"b"]) + encode_data(b"c"), S + 5 + 5 + STOP_LEN, "data after STOP"),
        (encode_stream([b"a"]) + b"\0", S + 5 + STOP_LEN, "data after STOP"),
        (encode_control(START, (b"protobuf:dnstap.Dnstap",)) + encode_data(b"ok") + b"\0\0\0\0\0\0\x10\0",
         S + 6, "bad control frame"),
        (encode_control(START, (b"protobuf:dnstap.Dnstap",)) + encode_data(b"ok") + b"\0\0\0\0\0\0\0\x02ab",
         S + 6, "bad control frame"),
        (encode_control(START, (b"protobuf:dnstap.Dnstap",)) + encode_data(b"ok") + struct.pack(">I", 17 << 20)
         + b"x" * 100, S + 6, "exceeds the limit"),
    ],
)
def test_damage_kinds(data, offset, reason):
    batches, reader = read_all(data, "f")
    assert reader.damage is not None, reader.damage
    assert reader.damage.offset == offset and reason in reader.damage.reason, reader.damage
    # the complete frames before the damage are still read
    if offset == S + 6:
        assert batches == [[b"ok"]]
    if "after STOP" in reason:
        assert [f for b in batches for f in b] in ([b"a", b"b"], [b"a"])


def test_start_without_content_type_and_unknown_controls_are_accepted():
    data = encode_control(START) + encode_data(b"a") + encode_control(0x99) + encode_data(b"b") + encode_control(STOP)
    batches, reader = read_all(data)
    assert reader.clean and batches == [[b"a", b"b"]] and reader.ignored_controls == 1


def test_open_capture_missing_file(tmp_path):
    with pytest.raises(OSError):
        open_capture(str(tmp_path / "nope.fstrm"))
