"""The TiPAI database: idempotent writes, resume after a writer is killed mid-transaction, and
refusal of corrupt, foreign, other-version and other-configuration files."""

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import faithfulness_db_writer as writer
import numpy as np
import pytest

from xclip.faithfulness.database import (
    SCHEMA_VERSION,
    FaithfulnessDatabase,
    FaithfulnessDatabaseError,
    blob_to_grid,
    grid_to_blob,
)

ROOT = Path(__file__).resolve().parents[2]


def run_writer(db: Path, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "helpers" / "faithfulness_db_writer.py"), str(db), *extra],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def dump(path: Path) -> dict:
    with FaithfulnessDatabase(path, readonly=True) as db:
        return db.dump()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "tipai.db"
    assert writer.main([str(path)]) == 0
    return path


def test_grid_blob_round_trip():
    grid = np.arange(9, dtype=np.float32).reshape(3, 3) / 7
    assert np.array_equal(blob_to_grid(*grid_to_blob(grid)), grid)
    with pytest.raises(ValueError, match="square"):
        grid_to_blob(np.zeros((2, 3)))


def test_rewriting_is_idempotent(clean, tmp_path):
    with FaithfulnessDatabase(clean, readonly=True) as db:
        counts = db.counts()
        pairs = db.pairs("p00")
        scores = db.scores("p00")
    n_prompts = writer.N_BATCHES * writer.PER_BATCH
    assert counts == {
        "meta": 3,
        "prompts": n_prompts,
        "images": n_prompts * writer.PER_PROMPT,
        "scores": n_prompts * writer.PER_PROMPT * 2,
        "pairs": n_prompts,
    }
    assert len(pairs) == 1 and scores["p00_0"]["crops"].grid.shape == (3, 3)
    copy = tmp_path / "again.db"
    copy.write_bytes(clean.read_bytes())
    with FaithfulnessDatabase(copy, writer.CONFIG) as db:
        # writing every prompt again (not skipping complete ones) replaces rows, never duplicates them
        for b in range(writer.N_BATCHES):
            db.write(writer.prompt_record(b, p) for p in range(writer.PER_BATCH))
        assert db.counts() == counts
    assert dump(copy) == dump(clean)


def test_a_run_killed_mid_transaction_resumes_where_it_stopped(clean, tmp_path):
    path = tmp_path / "crashed.db"
    proc = run_writer(path, "--hang-in-batch", "2")
    lines = []
    for line in proc.stdout:  # wait until batch 2's transaction holds rows
        lines.append(line.strip())
        if line.strip() == "hanging":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert lines == ["committed 0", "committed 1", "hanging"]
    with FaithfulnessDatabase(path, writer.CONFIG) as db:
        # batches 0 and 1 complete, nothing of the interrupted batch 2
        assert db.complete_prompts() == {f"p{b}{p}" for b in (0, 1) for p in range(writer.PER_BATCH)}
        assert db.counts()["prompts"] == 2 * writer.PER_BATCH
        assert db.counts()["images"] == 2 * writer.PER_BATCH * writer.PER_PROMPT
    resumed = run_writer(path)
    out, _ = resumed.communicate(timeout=300)  # a bound on a hang, generous for loaded CI cores
    assert resumed.returncode == 0, out
    assert dump(path) == dump(clean)


def test_corrupt_foreign_and_other_version_files_are_refused(clean, tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 40)
    with pytest.raises(FaithfulnessDatabaseError, match=f"{junk}.*not an SQLite database"):
        FaithfulnessDatabase(junk)

    damaged = tmp_path / "damaged.db"
    data = bytearray(clean.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)  # every page after the first overwritten
    damaged.write_bytes(bytes(data))
    with pytest.raises(FaithfulnessDatabaseError, match=f"{damaged}.*(damaged|not a readable)"):
        FaithfulnessDatabase(damaged, readonly=True)

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(FaithfulnessDatabaseError, match=f"{foreign}.*another application.*users"):
        FaithfulnessDatabase(foreign)

    old = tmp_path / "old.db"
    old.write_bytes(clean.read_bytes())
    with sqlite3.connect(old) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(FaithfulnessDatabaseError, match=f"schema version {SCHEMA_VERSION + 1}"):
        FaithfulnessDatabase(old)


def test_another_scoring_configuration_is_refused_and_empty_files_are_adopted(clean, tmp_path):
    other = tmp_path / "other.db"
    other.write_bytes(clean.read_bytes())
    with pytest.raises(FaithfulnessDatabaseError, match=r"another configuration \(grid: 3 there, 7 now\)"):
        FaithfulnessDatabase(other, {**writer.CONFIG, "grid": 7})
    empty = tmp_path / "empty.db"
    empty.touch()
    with FaithfulnessDatabase(empty, writer.CONFIG) as db:
        assert db.counts()["prompts"] == 0 and db.stored_config() == writer.CONFIG
    with pytest.raises(FileNotFoundError, match="no such TiPAI database"):
        FaithfulnessDatabase(tmp_path / "missing.db", readonly=True)


@pytest.mark.parametrize("folder", ["run%41", "run#1", "run?x=1"])
def test_read_only_opening_keeps_url_characters_of_folder_names(clean, tmp_path, folder):
    """The read-only URI quotes the path: 'run%41' is not 'runA', '#' and '?' stay in the name."""
    target = tmp_path / folder / "tipai.db"
    target.parent.mkdir()
    target.write_bytes(clean.read_bytes())
    decoy = tmp_path / "runA" / "tipai.db"  # what an unquoted 'run%41' would open
    decoy.parent.mkdir()
    with FaithfulnessDatabase(decoy, writer.CONFIG) as db:
        db.write([writer.prompt_record(0, 0)])

    def files() -> list[str]:  # SQLite's own -wal / -shm files beside a WAL database aside
        return sorted(
            str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.name.endswith(("-wal", "-shm"))
        )

    before = files()
    with FaithfulnessDatabase(target, readonly=True) as db:
        assert db.counts()["prompts"] == writer.N_BATCHES * writer.PER_BATCH
    assert files() == before  # no stray file ('run' for 'run#1')


def test_a_version_1_database_is_refused_with_what_to_do(clean, tmp_path):
    old = tmp_path / "v1.db"
    old.write_bytes(clean.read_bytes())
    with sqlite3.connect(old) as conn:
        conn.execute("PRAGMA user_version = 1")
    for readonly in (False, True):
        with pytest.raises(
            FaithfulnessDatabaseError,
            match=f"{old}: TiPAI schema version 1, written by an older xclip .*"
            "score the images again into a new database",
        ):
            FaithfulnessDatabase(old, None if readonly else writer.CONFIG, readonly=readonly)


def test_image_paths_must_be_files_of_the_prompts_folder(tmp_path):
    rec = writer.prompt_record(0, 0)
    rec.images[0].path = "/data/../etc/p00_0.png"
    with FaithfulnessDatabase(tmp_path / "tipai.db", writer.CONFIG) as db:
        with pytest.raises(
            ValueError,
            match=r"image paths must be absolute paths of files directly inside the "
            r"prompt's root '/data', got \['/data/../etc/p00_0.png'\]",
        ):
            db.write([rec])
        assert db.counts()["images"] == 0
