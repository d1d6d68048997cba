"""core/progress.py: the replay's progress board, shared by processes."""

from __future__ import annotations

import multiprocessing

from core.progress import ProgressBoard


def _read_file(path: str, slot: int, frames: int) -> None:
    board = ProgressBoard.attach(path, 3)
    for n in range(0, frames + 1, 100):
        board.report(slot, n)
    board.report(slot, frames, done=True)
    board.close()


def test_slots_written_by_other_processes_add_up(tmp_path):
    path = str(tmp_path / "board")
    board = ProgressBoard(path, 3, create=True)
    assert board.totals() == (0, 0)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_read_file, args=(path, slot, frames)) for slot, frames in ((0, 1000), (2, 250))]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert board.totals() == (2, 1250)
    board.report(1, 7)
    assert board.totals() == (2, 1257)
    board.close()


def test_attach_without_a_board_is_none(tmp_path):
    assert ProgressBoard.attach(None, 3) is None
    assert ProgressBoard.attach(str(tmp_path / "missing"), 3) is None
