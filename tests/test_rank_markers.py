"""Per-rank markers (sampling.layout.RankMarkers) and their two users: ``.progress/`` and ``.failed/``."""

import os
import types

import pytest

from sampling.progress import PeerFailedError, raise_if_peer_failed
from sampling.layout import RankMarkers, RunLayout
from sampling.progress import Progress


def test_markers_are_written_read_by_rank_and_cleared(tmp_path):
    markers = RankMarkers(str(tmp_path / ".progress"))
    assert markers.read_all() == {}  # no directory yet
    assert markers.write(10, "7") and markers.write(2, "5")
    (tmp_path / ".progress" / "notes.txt").write_text("not a marker")
    (tmp_path / ".progress" / ".rank3.txt.tmp-abc").write_text("a write cut short")
    assert list(markers.read_all().items()) == [(2, "5"), (10, "7")]  # by rank, not by name
    assert markers.write(2, "6") and markers.read_all()[2] == "6"
    markers.clear()
    assert not os.path.exists(tmp_path / ".progress")


def test_markers_never_go_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    markers = RankMarkers(str(tmp_path / ".failed"))
    markers.write(0, "ValueError: x")
    os.symlink(victim, tmp_path / ".failed" / "rank1.txt")
    assert markers.read_all() == {0: "ValueError: x"}  # not read through
    assert markers.write(1, "replaced")
    assert victim.read_text() == "keep me" and not os.path.islink(tmp_path / ".failed" / "rank1.txt")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / ".progress")
    assert not RankMarkers(str(tmp_path / ".progress")).write(0, "3")  # a directory link: nothing written
    assert os.listdir(elsewhere) == []


def test_markers_of_a_run_started_before_the_change_are_read(tmp_path):
    (tmp_path / ".progress").mkdir()
    (tmp_path / ".progress" / "rank0.txt").write_text("12")
    (tmp_path / ".progress" / "rank1.txt").write_text("8")
    layout = RunLayout(str(tmp_path), num_samples=100, image_size=32, shard_size=10)
    assert layout.progress_markers.read_all() == {0: "12", 1: "8"}


def test_a_peers_failure_note_stops_this_rank_and_its_own_does_not(tmp_path):
    failures = RunLayout(str(tmp_path), 8, 32, 4).failure_markers
    raise_if_peer_failed(failures, 0)  # no notes
    failures.write(0, "OSError: mine")
    raise_if_peer_failed(failures, 0)
    failures.write(3, "RuntimeError: the GPU fell off")
    with pytest.raises(PeerFailedError, match=r"^rank 3 failed: RuntimeError: the GPU fell off$"):
        raise_if_peer_failed(failures, 0)
    with pytest.raises(PeerFailedError, match=r"^rank 0 failed: OSError: mine$"):
        raise_if_peer_failed(failures, 3)


def test_remove_markers_keeps_the_claims_when_asked(tmp_path):
    layout = RunLayout(str(tmp_path), 8, 32, 4)
    layout.progress_markers.write(0, "4")
    layout.failure_markers.write(1, "x")
    os.makedirs(layout.claims_dir)
    layout.remove_markers(claims=False)
    assert os.path.isdir(layout.claims_dir)
    assert not os.path.exists(layout.progress_markers.directory) and not os.path.exists(
        layout.failure_markers.directory)
    layout.remove_markers()
    assert not os.path.exists(layout.claims_dir)


def test_rank0s_progress_counts_every_ranks_marker(tmp_path, capsys):
    layout = RunLayout(str(tmp_path / "run"), 100, 32, 10)
    os.makedirs(layout.out_dir)
    plan = types.SimpleNamespace(layout=layout, out_dir=layout.out_dir, done_images=20,
                                 settings=types.SimpleNamespace(sampling=types.SimpleNamespace(num_samples=100)))
    rank0, rank1 = Progress(plan, 0), Progress(plan, 1)
    rank1.advance(10)
    rank1.advance(5)
    layout.progress_markers.write(2, "garbage")  # unreadable counts are left out
    rank0.advance(4)
    assert layout.progress_markers.read_all() == {0: "4", 1: "15", 2: "garbage"}
    rank0.close()
    assert rank0.done == 20 + 15 + 4
    assert "run: 39/100 images" in capsys.readouterr().err
