"""Real lists: videos missing from disk are left out only when the user says so, from every command that
materialises frames, counted and shown; a video listed twice is refused naming both lines, or kept
once with --dedupe."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import catalog_rows, run_cli
from .test_frames import make_dataset
from .test_train import TINY, prepared_home, world  # noqa: F401  (the module-scoped world fixture)


def test_a_video_listed_twice_is_refused_naming_both_lines_or_kept_once(tmp_path: Path, home: Path) -> None:
    config = make_dataset(tmp_path, per_class=2, broken=False)
    listing = tmp_path / "lists" / "train.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([*lines, lines[1].replace(" 0", " 1")]) + "\n")  # line 7 repeats line 2
    args = ["frames", "-d", "toy", "--list", "train", "--config", config, "--home", home]
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{listing} line 7: video {lines[1].split()[0]} is listed again (first at line 2)" in r.stderr
    assert "with another label (0 there, 1 here)" in r.stderr and "--dedupe" in r.stderr
    kept = run_cli(*args, "--dedupe")
    assert kept.returncode == 0 and "kept 1 repeated list lines once (--dedupe)" in kept.stdout
    assert catalog_rows(home, "SELECT count(*), count(DISTINCT video) FROM frames") == [(6, 6)]


@pytest.mark.slow
def test_a_list_with_missing_videos_trains_and_evaluates_once_told_to(tmp_path: Path, world: Path) -> None:  # noqa: F811
    """5 % of the world's training videos and a few test videos gone, as in every public Kinetics copy."""
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    train = [line.split()[0] for line in (copy / "lists" / "train.txt").read_text().splitlines()]
    gone = train[::20]  # 10 of 192
    test = [line.split()[0] for line in (copy / "lists" / "test.txt").read_text().splitlines()]
    for rel in [*gone, test[0]]:
        (copy / "videos" / rel).unlink()
    home = tmp_path / "home"
    prepared_home(home, copy)
    config = copy / "msta.toml"
    args = ["-d", "world", "--shots", "16", "--draw-shots", "--epochs", "1", "--heldout-per-class", "0", *TINY,
            "--config", config, "--home", home]
    refused = run_cli("train", *args)
    assert refused.returncode == 2 and "are missing under" in refused.stderr and "--skip-missing" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    r = run_cli("train", *args, "--skip-missing")
    assert r.returncode == 0, r.stderr
    assert f"skipping {len(gone)} missing videos" in r.stdout
    assert f"trained without {len(gone)} listed videos missing from disk" in r.stdout
    assert catalog_rows(home, "SELECT (summary->>'videos_missing')::INT FROM runs WHERE stage = 'train'") == [
        (len(gone),)]
    refused = run_cli("evaluate", "-d", "world", "--selection", "last", "--config", config, "--home", home)
    assert refused.returncode == 2 and "--skip-missing" in refused.stderr
    r = run_cli("evaluate", "-d", "world", "--selection", "last", "--skip-missing", "--config", config, "--home", home)
    assert r.returncode == 0, r.stderr
    assert catalog_rows(home, "SELECT (summary->>'videos_missing')::INT, (summary->>'videos')::INT FROM runs "
                              "WHERE stage = 'evaluate'") == [(1, len(test) - 1)]
    report = run_cli("report", "--home", home).stdout
    assert "## Videos left out" in report
    assert f"- trained without {len(gone)}: train:adapter:world:few-shot:k16:" in report
    assert "- tested without 1: evaluate:train:adapter:world" in report
    features = run_cli("features", "-d", "world", "--list", "test", "--skip-missing", "--workers", "0",
                       "--config", config, "--home", home)
    assert features.returncode == 0, features.stderr


def test_too_many_held_out_videos_names_the_held_out_flag(tmp_path: Path, world: Path) -> None:  # noqa: F811
    r = run_cli("train", "-d", "world", "--shots", "2", "--draw-shots", "--heldout-per-class", "20",
                "--no-consistency", "--epochs", "1", *TINY, "--config", world / "msta.toml", "--home", tmp_path / "h")
    assert r.returncode == 2 and "cannot draw 20 videos per class" in r.stderr
    assert "lower --heldout-per-class" in r.stderr and "--shots" not in r.stderr.split("videos per class:")[1]


def test_a_long_index_goes_to_disk_in_row_groups_with_a_digest_of_its_rows(tmp_path: Path) -> None:
    """`frames` writes its index chunk by chunk (cache.store.TableSink): the same rows in the same
    batches give the same digest, any other row another; the saved file carries the provenance and
    is read one row group at a time; an error while writing leaves no temporary behind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cache.store import ROW_GROUP, Store, table_digest

    store = Store(tmp_path)
    schema = pa.schema([("video", pa.string()), ("label", pa.int32())])

    def batch(first: int, n: int) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist([{"video": f"v{i}.mp4", "label": i % 7} for i in range(first, first + n)],
                                          schema=schema)

    def digest_of(batches: list[pa.RecordBatch]) -> str:
        sink = store.table_sink("frame_index", schema)
        for b in batches:
            sink.write(b)
        digest = sink.finish()
        sink.discard()
        return digest

    rows = [batch(0, 3000), batch(3000, 2000)]
    assert digest_of(rows) == digest_of([batch(0, 3000), batch(3000, 2000)])
    assert digest_of(rows) != digest_of([batch(0, 3000), batch(3001, 2000)])
    assert digest_of([batch(0, 10)]) == table_digest(pa.Table.from_batches([batch(0, 10)]))  # one batch: as before

    sink = store.table_sink("frame_index", schema)
    with sink.discarded_on_error():
        for b in rows:
            sink.write(b)
    out = tmp_path / "index.parquet"
    sink.save(out, {"stage": "frames", "list": "train"})
    saved = pq.ParquetFile(out)
    assert saved.metadata.num_rows == 5000 == sink.num_rows
    assert max(saved.metadata.row_group(i).num_rows for i in range(saved.num_row_groups)) == ROW_GROUP
    assert saved.schema_arrow.metadata[b"msta.list"] == b'"train"'
    assert saved.read().to_pylist() == pa.Table.from_batches(rows).to_pylist()
    assert list((tmp_path / "artifacts" / "frame_index").iterdir()) == []  # the temporary is gone

    with pytest.raises(KeyboardInterrupt):
        broken = store.table_sink("frame_index", schema)
        with broken.discarded_on_error():
            broken.write(batch(0, 5))
            raise KeyboardInterrupt
    assert list((tmp_path / "artifacts" / "frame_index").iterdir()) == []
