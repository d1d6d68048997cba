"""Frame Streams codec and sans-IO reader session (core/framestream.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import framestream as fs
from core.errors import (
    ContentTypeMismatch,
    FrameStreamError,
    FrameTooLarge,
    ReceiverError,
    UnexpectedFrame,
)
from core.framestream import (
    ACCEPT,
    CONTENT_TYPE_DNSTAP,
    FINISH,
    MAX_CONTROL_FRAME_SIZE,
    READY,
    START,
    STOP,
    ControlFrame,
    ReaderSession,
    encode_control,
    encode_data,
    encode_stream,
    parse_control,
)

CT = CONTENT_TYPE_DNSTAP  # b"protobuf:dnstap.Dnstap", 22 bytes
CT_FIELD = bytes.fromhex("00000001 00000016") + CT

# --------------------------------------------------------------------------
# Golden encodings (byte for byte, as libfstrm writes them)
# --------------------------------------------------------------------------

GOLDEN_READY = bytes.fromhex("00000000 00000022 00000004") + CT_FIELD
GOLDEN_ACCEPT = bytes.fromhex("00000000 00000022 00000001") + CT_FIELD
GOLDEN_START = bytes.fromhex("00000000 00000022 00000002") + CT_FIELD
GOLDEN_START_BARE = bytes.fromhex("00000000 00000004 00000002")
GOLDEN_STOP = bytes.fromhex("00000000 00000004 00000003")
GOLDEN_FINISH = bytes.fromhex("00000000 00000004 00000005")


def test_control_type_values_match_fstrm():
    assert (ACCEPT, START, STOP, READY, FINISH) == (1, 2, 3, 4, 5)
    assert CT == b"protobuf:dnstap.Dnstap"
    assert MAX_CONTROL_FRAME_SIZE == 512


@pytest.mark.parametrize(
    "ctype, types, golden",
    [
        (READY, (CT,), GOLDEN_READY),
        (ACCEPT, (CT,), GOLDEN_ACCEPT),
        (START, (CT,), GOLDEN_START),
        (START, (), GOLDEN_START_BARE),
        (STOP, (), GOLDEN_STOP),
        (FINISH, (), GOLDEN_FINISH),
    ],
)
def test_golden_control_frames(ctype, types, golden):
    assert encode_control(ctype, types) == golden
    assert encode_control(ctype, list(types)) == golden
    # parse_control takes the body: without the escape and the length words.
    assert parse_control(golden[8:]) == ControlFrame(ctype, tuple(types))


def test_golden_control_with_two_content_types():
    frame = encode_control(READY, (b"a", b"bc"))
    assert frame == bytes.fromhex(
        "00000000 00000017 00000004 00000001 00000001 61 00000001 00000002 6263"
    )
    assert parse_control(frame[8:]).content_types == (b"a", b"bc")


def test_golden_data_frame():
    assert encode_data(b"\x01\x02\x03") == bytes.fromhex("00000003 010203")
    big = bytes(range(256)) * 2
    assert encode_data(big) == b"\x00\x00\x02\x00" + big


def test_empty_data_frame_is_refused():
    with pytest.raises(ValueError):
        encode_data(b"")


def test_golden_stream():
    assert encode_stream([b"ab", b"c"]) == (
        GOLDEN_START + bytes.fromhex("00000002 6162 00000001 63") + GOLDEN_STOP
    )
    assert encode_stream([], content_type=b"x") == (
        bytes.fromhex("00000000 0000000d 00000002 00000001 00000001 78") + GOLDEN_STOP
    )


def test_control_frame_names():
    assert ControlFrame(READY).name == "READY"
    assert ControlFrame(FINISH).name == "FINISH"
    assert ControlFrame(99).name == "UNKNOWN(99)"


def test_parse_control_ignores_unknown_fields():
    body = struct.pack(">I", START) + struct.pack(">II", 7, 3) + b"xyz" + CT_FIELD
    assert parse_control(body) == ControlFrame(START, (CT,))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\x00\x02",
        struct.pack(">I", START) + b"\x00\x00\x00\x01\x00\x00",  # truncated field header
        struct.pack(">I", START) + struct.pack(">II", 1, 10) + b"short",  # value overruns
    ],
)
def test_parse_control_rejects_malformed_bodies(body):
    with pytest.raises(FrameStreamError):
        parse_control(body)


def test_error_hierarchy():
    for exc in (ContentTypeMismatch, FrameTooLarge, UnexpectedFrame):
        assert issubclass(exc, FrameStreamError)
    assert issubclass(FrameStreamError, ReceiverError)
    # Each exception's docstring is its default message.
    assert str(FrameTooLarge()) == FrameTooLarge.__doc__


# --------------------------------------------------------------------------
# Reader session: handshakes
# --------------------------------------------------------------------------


def test_bidirectional_handshake():
    s = ReaderSession()
    frames: list = []
    reply = s.receive(GOLDEN_READY, frames)
    assert reply == GOLDEN_ACCEPT
    assert s.bidirectional and not s.finished
    assert s.receive(GOLDEN_START, frames) == b""
    assert s.receive(encode_data(b"one") + encode_data(b"two"), frames) == b""
    assert frames == [b"one", b"two"]
    assert not s.finished
    assert s.receive(GOLDEN_STOP, frames) == GOLDEN_FINISH
    assert s.finished
    assert s.pending == 0
    assert frames == [b"one", b"two"]


def test_accept_echoes_only_our_type_when_several_are_offered():
    s = ReaderSession()
    reply = s.receive(encode_control(READY, (b"other:type", CT)), [])
    assert reply == GOLDEN_ACCEPT


def test_bidirectional_handshake_in_one_chunk():
    s = ReaderSession()
    frames: list = []
    stream = GOLDEN_READY + GOLDEN_START + encode_data(b"x") + GOLDEN_STOP
    assert s.receive(stream, frames) == GOLDEN_ACCEPT + GOLDEN_FINISH
    assert frames == [b"x"] and s.finished


def test_bidirectional_stop_without_data():
    s = ReaderSession()
    assert s.receive(GOLDEN_READY, []) == GOLDEN_ACCEPT
    assert s.receive(GOLDEN_STOP, []) == GOLDEN_FINISH
    assert s.finished


def test_unidirectional_stream_sends_no_replies():
    s = ReaderSession()
    frames: list = []
    assert s.receive(GOLDEN_START, frames) == b""
    assert not s.bidirectional
    assert s.receive(encode_data(b"a"), frames) == b""
    assert s.receive(GOLDEN_STOP, frames) == b""  # no FINISH on a unidirectional stream
    assert s.finished
    assert frames == [b"a"]


def test_start_without_content_type_is_accepted():
    s = ReaderSession()
    frames: list = []
    s.receive(GOLDEN_START_BARE + encode_data(b"p") + GOLDEN_STOP, frames)
    assert frames == [b"p"] and s.finished


def test_custom_content_type():
    s = ReaderSession(content_type=b"x-test")
    assert s.receive(encode_control(READY, (b"x-test",)), []) == encode_control(ACCEPT, (b"x-test",))
    with pytest.raises(ContentTypeMismatch):
        ReaderSession(content_type=b"x-test").receive(GOLDEN_START, [])


@pytest.mark.parametrize("ctype, what", [(READY, "READY"), (START, "START")])
def test_wrong_content_type_is_refused(ctype, what):
    s = ReaderSession()
    with pytest.raises(ContentTypeMismatch) as info:
        s.receive(encode_control(ctype, (b"protobuf:other.Thing",)), [])
    message = str(info.value)
    assert "protobuf:other.Thing" in message
    assert what in message
    assert "protobuf:dnstap.Dnstap" in message  # what we expected


def test_ready_without_content_type_is_refused():
    with pytest.raises(ContentTypeMismatch) as info:
        ReaderSession().receive(encode_control(READY), [])
    assert "none" in str(info.value)


def test_wrong_content_type_in_start_after_accept():
    s = ReaderSession()
    s.receive(GOLDEN_READY, [])
    with pytest.raises(ContentTypeMismatch):
        s.receive(encode_control(START, (b"nope",)), [])


def test_unknown_control_types_are_ignored_and_counted():
    s = ReaderSession()
    frames: list = []
    assert s.receive(encode_control(0x42), frames) == b""  # before the handshake
    assert s.ignored_controls == 1
    s.receive(GOLDEN_START, frames)
    s.receive(encode_control(0x1234, (b"whatever",)) + encode_data(b"d"), frames)
    s.receive(encode_control(0xFFFFFFFF), frames)
    assert s.ignored_controls == 3
    s.receive(GOLDEN_STOP, frames)
    assert frames == [b"d"] and s.finished and s.ignored_controls == 3


@pytest.mark.parametrize(
    "prefix, frame",
    [
        (b"", GOLDEN_ACCEPT),  # ACCEPT is for the sender to receive
        (b"", GOLDEN_FINISH),
        (b"", GOLDEN_STOP),  # STOP before the stream started
        (GOLDEN_START, GOLDEN_START),  # a second START
        (GOLDEN_START, GOLDEN_READY),  # READY after START
        (GOLDEN_READY, GOLDEN_READY),  # a second READY
        (GOLDEN_READY, GOLDEN_ACCEPT),
    ],
)
def test_known_control_in_the_wrong_state(prefix, frame):
    s = ReaderSession()
    s.receive(prefix, [])
    with pytest.raises(UnexpectedFrame):
        s.receive(frame, [])


def test_data_before_start_is_refused():
    with pytest.raises(UnexpectedFrame):
        ReaderSession().receive(encode_data(b"early"), [])
    s = ReaderSession()
    s.receive(GOLDEN_READY, [])  # after ACCEPT, still before START
    with pytest.raises(UnexpectedFrame):
        s.receive(encode_data(b"early"), [])


def test_data_before_start_is_refused_on_its_length_word():
    s = ReaderSession()
    with pytest.raises(UnexpectedFrame):
        s.receive(b"\x00\x00\x00\x05", [])


def test_bytes_after_stop_are_refused():
    s = ReaderSession()
    frames: list = []
    with pytest.raises(UnexpectedFrame):
        s.receive(GOLDEN_START + encode_data(b"a") + GOLDEN_STOP + b"junk", frames)
    assert frames == [b"a"]
    assert s.finished


def test_bytes_after_stop_do_not_accumulate():
    """A sender that keeps writing after STOP must not grow the buffer."""
    s = ReaderSession()
    s.receive(GOLDEN_START + GOLDEN_STOP, [])
    assert s.finished
    assert s.receive(b"", []) == b""
    for _ in range(3):
        with pytest.raises(UnexpectedFrame):
            s.receive(encode_data(b"x" * 1000), [])
        assert s.pending <= 8


# --------------------------------------------------------------------------
# Size limits and partial frames
# --------------------------------------------------------------------------


def test_oversized_data_frame_is_refused_on_its_length_word():
    s = ReaderSession(max_frame_size=100)
    frames: list = []
    s.receive(GOLDEN_START, frames)
    s.receive(encode_data(b"x" * 100), frames)  # exactly the maximum is fine
    assert frames == [b"x" * 100]
    # Three of the four length bytes: nothing to decide yet.
    s.receive(b"\x00\x00\x00", frames)
    assert s.pending == 3
    with pytest.raises(FrameTooLarge) as info:
        s.receive(b"\x65", frames)  # 101 bytes announced, no body sent
    assert "101" in str(info.value)
    assert s.pending <= 8  # the body was never buffered


def test_oversized_frame_refused_with_its_body_in_the_same_chunk():
    s = ReaderSession(max_frame_size=1000)
    s.receive(GOLDEN_START, [])
    with pytest.raises(FrameTooLarge):
        s.receive(struct.pack(">I", 5000) + b"y" * 100, [])
    assert s.pending <= 8


def test_huge_length_word_refused_with_default_limit():
    s = ReaderSession()
    s.receive(GOLDEN_START, [])
    with pytest.raises(FrameTooLarge):
        s.receive(b"\xff\xff\xff\xff", [])
    assert s.pending <= 8


def test_control_frame_over_512_bytes_is_refused():
    s = ReaderSession()
    head = struct.pack(">II", 0, MAX_CONTROL_FRAME_SIZE + 1)
    with pytest.raises(FrameTooLarge):
        s.receive(head, [])
    assert s.pending <= 8


def test_control_frame_of_exactly_512_bytes_is_accepted():
    padding = b"p" * (MAX_CONTROL_FRAME_SIZE - 4 - 8 - len(CT) - 8)
    body = struct.pack(">I", START) + CT_FIELD + struct.pack(">II", 9, len(padding)) + padding
    assert len(body) == MAX_CONTROL_FRAME_SIZE
    s = ReaderSession()
    frames: list = []
    s.receive(struct.pack(">II", 0, len(body)) + body + encode_data(b"z"), frames)
    assert frames == [b"z"]


def test_control_frame_too_short_for_its_type():
    with pytest.raises(FrameStreamError):
        ReaderSession().receive(b"\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00", [])


def test_pending_reports_a_half_received_frame():
    s = ReaderSession()
    frames: list = []
    s.receive(GOLDEN_START, frames)
    assert s.pending == 0
    frame = encode_data(b"0123456789")
    s.receive(frame[:7], frames)
    assert s.pending == 7 and frames == []
    s.receive(frame[7:11], frames)
    assert s.pending == 11 and frames == []
    s.receive(frame[11:] + frame[:2], frames)
    assert frames == [b"0123456789"]
    assert s.pending == 2
    s.receive(frame[2:], frames)
    assert frames == [b"0123456789"] * 2 and s.pending == 0


def test_pending_reports_a_half_received_control_frame():
    s = ReaderSession()
    s.receive(GOLDEN_READY[:5], [])
    assert s.pending == 5
    s.receive(GOLDEN_READY[5:20], [])
    assert s.pending == 20
    assert s.receive(GOLDEN_READY[20:], []) == GOLDEN_ACCEPT
    assert s.pending == 0


def test_reader_session_on_capture_file_in_pieces():
    """A real capture, fed in odd-sized pieces, gives the same frames as in one go."""
    data = (Path(__file__).parent / "data" / "captures" / "named.fstrm").read_bytes()
    whole: list = []
    s = ReaderSession()
    s.receive(data, whole)
    assert s.finished and s.pending == 0 and len(whole) == 100
    pieces: list = []
    s = ReaderSession()
    for i in range(0, len(data), 7):
        s.receive(data[i : i + 7], pieces)
    assert pieces == whole and s.finished


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

payloads_st = st.lists(st.binary(min_size=1, max_size=300), max_size=30)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@settings(max_examples=200, deadline=None)
@given(payloads=payloads_st, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_roundtrip_unidirectional_any_chunking(payloads, cuts):
    stream = encode_stream(payloads)
    s = ReaderSession()
    frames: list = []
    for piece in _chunks(stream, cuts):
        assert s.receive(piece, frames) == b""
        assert s.pending <= 300 + 8
    assert frames == payloads
    assert s.finished and s.pending == 0


@settings(max_examples=150, deadline=None)
@given(payloads=payloads_st, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_roundtrip_bidirectional_any_chunking(payloads, cuts):
    stream = GOLDEN_READY + GOLDEN_START + b"".join(map(encode_data, payloads)) + GOLDEN_STOP
    s = ReaderSession()
    frames: list = []
    replies = b""
    for piece in _chunks(stream, cuts):
        replies += s.receive(piece, frames)
    assert replies == GOLDEN_ACCEPT + GOLDEN_FINISH
    assert frames == payloads
    assert s.finished and s.pending == 0


@settings(max_examples=100, deadline=None)
@given(payloads=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=10))
def test_roundtrip_one_byte_at_a_time(payloads):
    stream = encode_stream(payloads)
    s = ReaderSession()
    frames: list = []
    for i in range(len(stream)):
        s.receive(stream[i : i + 1], frames)
    assert frames == payloads and s.finished


def _bound(max_frame_size: int) -> int:
    # A partial data frame holds at most 4 + max_frame_size - 1 bytes, a partial
    # control frame at most 8 + 512 - 1.
    return max(max_frame_size, MAX_CONTROL_FRAME_SIZE) + 8


_tokens = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=200, max_size=700),
    st.sampled_from([GOLDEN_READY, GOLDEN_START, GOLDEN_START_BARE, GOLDEN_STOP,
                     GOLDEN_ACCEPT, GOLDEN_FINISH, encode_control(77)]),
    st.binary(min_size=1, max_size=40).map(encode_data),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">II", 0, n)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.lists(_tokens, max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    max_frame_size=st.sampled_from([16, 100, 600, fs.DEFAULT_MAX_FRAME_SIZE]),
    start=st.booleans(),
)
def test_arbitrary_input_raises_only_frame_stream_errors(tokens, cuts, max_frame_size, start):
    data = (GOLDEN_START if start else b"") + b"".join(tokens)
    s = ReaderSession(max_frame_size=max_frame_size)
    frames: list = []
    try:
        for piece in _chunks(data, cuts):
            reply = s.receive(piece, frames)
            assert isinstance(reply, bytes)
            assert s.pending <= _bound(max_frame_size)
    except FrameStreamError:
        pass
    assert s.pending <= _bound(max_frame_size)
    assert all(isinstance(f, bytes) and 0 < len(f) <= max_frame_size for f in frames)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_random_bytes_raise_only_frame_stream_errors(data, cuts):
    s = ReaderSession(max_frame_size=1024)
    try:
        for piece in _chunks(data, cuts):
            s.receive(piece, [])
            assert s.pending <= 1024 + 8
    except FrameStreamError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    payloads=payloads_st,
    bidirectional=st.booleans(),
    junk=st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=5),
)
def test_anything_after_stop_is_refused_and_never_buffered(payloads, bidirectional, junk):
    head = GOLDEN_READY if bidirectional else b""
    s = ReaderSession(max_frame_size=512)
    frames: list = []
    s.receive(head + encode_stream(payloads), frames)
    assert s.finished and frames == payloads
    for piece in junk:
        with pytest.raises(UnexpectedFrame):
            s.receive(piece, frames)
        assert s.pending <= _bound(512)
    assert frames == payloads
