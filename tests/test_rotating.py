"""sinks/rotating.py: the size-rotated output file."""

from __future__ import annotations

import os
import random
import threading

import pytest

from sinks.rotating import RotatingFile, open_shared, release_shared


def make_lines(n: int, seed: int = 1, low: int = 5, high: int = 90) -> list[bytes]:
    rnd = random.Random(seed)
    return [f"{i:06d} ".encode() + b"x" * rnd.randint(low, high) for i in range(n)]


def write_in_batches(rf: RotatingFile, lines: list[bytes], seed: int = 2) -> int:
    """As the sinks do: a batch's bytes, cut into lines only where it crosses a rotation."""
    rnd = random.Random(seed)
    written = pos = 0
    while pos < len(lines):
        k = rnd.randint(1, 40)
        chunk = lines[pos : pos + k]
        written += rf.write_batch(b"".join(line + rf.delimiter for line in chunk), lambda: chunk)
        pos += k
    return written


def rotated_files(path) -> list[str]:
    """FILE.n ... FILE.1, FILE: oldest first."""
    path = str(path)
    backups = []
    i = 1
    while os.path.exists(f"{path}.{i}"):
        backups.append(f"{path}.{i}")
        i += 1
    files = list(reversed(backups))
    if os.path.exists(path):
        files.append(path)
    return files


def read_lines(files) -> list[list[bytes]]:
    out = []
    for name in files:
        with open(name, "rb") as fh:
            data = fh.read()
        assert data == b"" or data.endswith(b"\n"), f"{name}: last line is cut"
        out.append(data.split(b"\n")[:-1] if data else [])
    return out


def test_rotation_keeps_every_line_in_order(tmp_path):
    path = tmp_path / "dnstap.log"
    max_size = 1000
    lines = make_lines(3000)
    rf = RotatingFile(str(path), max_size=max_size, count=1000)
    written = write_in_batches(rf, lines)
    rf.close()

    files = rotated_files(path)
    assert len(files) > 100, "the test is meant to rotate many times"
    assert rf.rotations == len(files) - 1
    assert not os.path.exists(f"{path}.{len(files)}")  # numbering has no gap
    per_file = read_lines(files)
    assert [line for chunk in per_file for line in chunk] == lines
    assert written == sum(len(line) + 1 for line in lines)
    for name, chunk in zip(files, per_file):
        size = os.path.getsize(name)
        assert size <= max_size, f"{name}: {size} bytes"
        assert chunk, f"{name}: empty file"
    # Each file was filled as far as the next line allowed.
    for name, nxt in zip(files, per_file[1:]):
        assert os.path.getsize(name) + len(nxt[0]) + 1 > max_size


def test_oversize_line_goes_alone_in_its_file(tmp_path):
    path = tmp_path / "out.log"
    rf = RotatingFile(str(path), max_size=100, count=20)
    huge = b"H" * 500
    rf.write_lines([b"a" * 30, b"b" * 30])
    rf.write_lines([huge, b"c" * 30])
    rf.write_lines([huge])
    rf.write_lines([b"d" * 10, huge, b"e" * 10])
    rf.close()
    per_file = read_lines(rotated_files(path))
    assert per_file == [
        [b"a" * 30, b"b" * 30],
        [huge],
        [b"c" * 30],
        [huge],
        [b"d" * 10],
        [huge],
        [b"e" * 10],
    ]
    for name in rotated_files(path):
        size = os.path.getsize(name)
        assert size <= 100 or size == len(huge) + 1


def test_count_limit_removes_oldest(tmp_path):
    path = tmp_path / "limited.log"
    lines = make_lines(2000, seed=3)
    rf = RotatingFile(str(path), max_size=500, count=3)
    write_in_batches(rf, lines, seed=4)
    rf.close()
    assert rf.rotations > 10
    files = rotated_files(path)
    assert files == [f"{path}.3", f"{path}.2", f"{path}.1", str(path)]
    assert not os.path.exists(f"{path}.4")
    kept = [line for chunk in read_lines(files) for line in chunk]
    assert kept == lines[len(lines) - len(kept) :], "the newest lines are kept, in order"
    assert all(os.path.getsize(f) <= 500 for f in files)


def test_count_one(tmp_path):
    path = tmp_path / "one.log"
    rf = RotatingFile(str(path), max_size=50, count=1)
    for i in range(10):
        rf.write_lines([f"line {i:02d} ".encode() + b"z" * 30])
    rf.close()
    assert rotated_files(path) == [f"{path}.1", str(path)]
    assert read_lines(rotated_files(path)) == [[b"line 08 " + b"z" * 30], [b"line 09 " + b"z" * 30]]


def test_no_rotation_when_max_size_is_zero(tmp_path):
    path = tmp_path / "forever.log"
    lines = make_lines(5000, seed=5)
    rf = RotatingFile(str(path), max_size=0, count=2)
    write_in_batches(rf, lines, seed=6)
    rf.close()
    assert rf.rotations == 0
    assert rotated_files(path) == [str(path)]
    assert read_lines([path]) == [lines]


def test_existing_file_size_counts(tmp_path):
    path = tmp_path / "existing.log"
    path.write_bytes(b"old line\n" * 100)  # 900 bytes
    rf = RotatingFile(str(path), max_size=1000, count=5)
    rf.write_lines([b"n" * 50])  # 900 + 51 fits
    rf.write_lines([b"m" * 60])  # would exceed: rotate first
    rf.close()
    assert read_lines(rotated_files(path)) == [[b"old line"] * 100 + [b"n" * 50], [b"m" * 60]]


def test_empty_batch_writes_nothing(tmp_path):
    for max_size in (0, 1000):
        path = tmp_path / f"empty-{max_size}.log"
        rf = RotatingFile(str(path), max_size=max_size, count=2)
        assert rf.write_lines([]) == 0
        rf.write_lines([b"x"])
        assert rf.write_lines([]) == 0
        rf.close()
        assert path.read_bytes() == b"x\n"


def test_other_delimiter(tmp_path):
    path = tmp_path / "nul.log"
    rf = RotatingFile(str(path), max_size=10, count=5, delimiter=b"\0")
    rf.write_lines([b"aaaa", b"bbbb", b"cccc"])
    rf.close()
    assert [open(f, "rb").read() for f in rotated_files(path)] == [b"aaaa\0bbbb\0", b"cccc\0"]


def test_count_must_be_positive_when_rotating(tmp_path):
    with pytest.raises(ValueError):
        RotatingFile(str(tmp_path / "x.log"), max_size=10, count=0)


def test_concurrent_writers_under_the_lock(tmp_path):
    path = tmp_path / "shared.log"
    rf = RotatingFile(str(path), max_size=2000, count=1000)
    per_thread = {t: [f"t{t}-{i:05d}".encode() for i in range(2000)] for t in range(4)}

    def writer(t: int) -> None:
        mine = per_thread[t]
        for i in range(0, len(mine), 7):
            with rf.lock:
                rf.write_lines(mine[i : i + 7])

    threads = [threading.Thread(target=writer, args=(t,)) for t in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rf.close()
    got = [line for chunk in read_lines(rotated_files(path)) for line in chunk]
    assert len(got) == 8000
    for t, mine in per_thread.items():
        assert [line for line in got if line.startswith(f"t{t}-".encode())] == mine


def test_open_shared_returns_one_writer_per_path(tmp_path, monkeypatch):
    path = tmp_path / "shared.log"
    a = open_shared(str(path), 100, 3)
    monkeypatch.chdir(tmp_path)
    b = open_shared("shared.log", 100, 3)  # the same file by another name
    other = open_shared(str(tmp_path / "other.log"), 100, 3)
    try:
        assert a is b
        assert other is not a
        with a.lock:
            a.write_lines([b"1" * 60])
        with b.lock:
            b.write_lines([b"2" * 60])  # one size count: this rotates
        assert a.rotations == 1
        release_shared(b)
        assert not a.closed, "still used by another DoFn"
        release_shared(a)
        assert a.closed
        c = open_shared(str(path), 100, 3)
        assert c is not a, "a closed writer is not handed out again"
        release_shared(c)
    finally:
        release_shared(other)
    assert read_lines(rotated_files(path)) == [[b"1" * 60], [b"2" * 60]]


def test_current_file_removed_before_rotation(tmp_path):
    """Someone deletes the current file: the next rotation starts a new one, and the
    writer keeps working (it must not be left with a closed file)."""
    path = tmp_path / "gone.log"
    rf = RotatingFile(str(path), max_size=100, count=3)
    rf.write_lines([b"a" * 60])
    rf.flush()
    os.unlink(path)
    rf.write_lines([b"b" * 60])  # rotates: there is no current file to rename
    rf.write_lines([b"c" * 20])
    rf.close()
    assert read_lines(rotated_files(path)) == [[b"b" * 60, b"c" * 20]]


def _write_from_process(path: str, tag: str, n: int, max_size: int) -> None:
    rf = RotatingFile(path, max_size=max_size, count=500)
    lines = [f"{tag} {i:06d} ".encode() + b"x" * (i % 50) for i in range(n)]
    write_in_batches(rf, lines, seed=hash(tag) & 0xFFFF)
    rf.close()


def test_processes_share_one_rotated_file(tmp_path):
    """Worker processes of a replay write the same path: every line lands
    whole, exactly once, in order per process, and no file passes the limit
    (each rotation is done by one process and seen by the others)."""
    import multiprocessing

    path = str(tmp_path / "shared.log")
    max_size, n, tags = 4096, 3000, ["p0", "p1", "p2"]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_from_process, args=(path, tag, n, max_size)) for tag in tags]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    files = rotated_files(path)
    assert len(files) > 10, "the test should make the processes rotate often"
    for name in files:
        assert os.path.getsize(name) <= max_size, name
    got = [line for chunk in read_lines(files) for line in chunk]
    for tag in tags:
        mine = [line for line in got if line.startswith(tag.encode() + b" ")]
        assert mine == [f"{tag} {i:06d} ".encode() + b"x" * (i % 50) for i in range(n)]
    assert len(got) == n * len(tags)


def test_new_file_filled_by_another_process_before_our_lock(tmp_path, monkeypatch):
    """Between our rename and our lock on the new file, another process creates
    it and fills it nearly to the limit: we rotate again instead of writing past
    the limit (the CI failure of session 3, made deterministic)."""
    import sinks.rotating as rotating

    path = tmp_path / "race.log"
    real_shift = rotating.shift_backups
    other = [b"o" * 89]

    def shift_then_other_process_writes(p, count):
        real_shift(p, count)
        if other:
            with open(p, "ab") as f:
                f.write(other.pop() + b"\n")

    monkeypatch.setattr(rotating, "shift_backups", shift_then_other_process_writes)
    rf = RotatingFile(str(path), max_size=100, count=5)
    rf.write_lines([b"a" * 60])
    rf.write_lines([b"b" * 60])
    rf.close()
    files = rotated_files(path)
    assert all(os.path.getsize(name) <= 100 for name in files)
    assert read_lines(files) == [[b"a" * 60], [b"o" * 89], [b"b" * 60]]


def test_a_failed_reopen_is_retried_at_the_next_write(tmp_path):
    """The directory goes away (the file was rotated away meanwhile): the write
    fails, no stale descriptor is kept, and writing resumes once it is back."""
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "out.log"
    rf = RotatingFile(str(path), max_size=0)
    rf.write_lines([b"one"])
    moved = tmp_path / "moved"
    directory.rename(moved)
    with pytest.raises(FileNotFoundError):
        rf.write_lines([b"lost"])
    assert not rf.closed
    directory.mkdir()
    rf.write_lines([b"two"])
    rf.close()
    assert (moved / "out.log").read_bytes() == b"one\n"
    assert path.read_bytes() == b"two\n"
    with pytest.raises(ValueError, match="closed"):
        rf.write_lines([b"three"])
