"""A writer process for the TiPAI database crash test: writes `N_BATCHES` batches of synthetic
prompts, skipping prompts the database already holds (resume). With ``--hang-in-batch k`` it stops
in the middle of batch k's transaction (after its first prompt's rows went in) and waits to be
killed, printing ``hanging`` so the test knows when."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np


def _database_module():
    """``xclip/faithfulness/database.py`` alone: importing the package would pull in torch and
    Lightning (tens of seconds per process start on loaded CI cores); the module needs only
    sqlite3 and numpy."""
    path = Path(__file__).resolve().parents[2] / "src" / "xclip" / "faithfulness" / "database.py"
    spec = importlib.util.spec_from_file_location("tipai_database_alone", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


_db = _database_module()
FaithfulnessDatabase, ImageRecord, PairRecord = _db.FaithfulnessDatabase, _db.ImageRecord, _db.PairRecord
PromptRecord, ScoreRecord = _db.PromptRecord, _db.ScoreRecord

N_BATCHES, PER_BATCH, PER_PROMPT = 4, 3, 4
CONFIG = {"backbone": "synthetic", "grid": 3}


def prompt_record(b: int, p: int) -> PromptRecord:
    pid = f"p{b}{p}"
    rng = np.random.default_rng([b, p])
    images = [
        ImageRecord(
            f"{pid}_{s}",
            pid,
            s,
            "folder",
            64,
            64,
            path=f"/data/{pid}_{s}.png",
            sha256=_db.sha256_hex(f"{pid}_{s}".encode()),
        )
        for s in range(PER_PROMPT)
    ]
    glob = rng.random(PER_PROMPT)
    scores = [ScoreRecord(im.image_id, "clip", float(g)) for im, g in zip(images, glob)]
    scores += [ScoreRecord(im.image_id, "crops", None, rng.random((3, 3)).astype(np.float32)) for im in images]
    best, worst = int(glob.argmax()), int(glob.argmin())
    pairs = [
        PairRecord(
            pid, images[best].image_id, images[worst].image_id, float(glob[best]), float(glob[worst]), "best_worst"
        )
    ]
    return PromptRecord(pid, f"prompt {b} {p}", images, scores, pairs, root="/data")


def batch(db: FaithfulnessDatabase, b: int, hang: bool):
    done = db.complete_prompts()
    for p in range(PER_BATCH):
        rec = prompt_record(b, p)
        if rec.prompt_id in done:
            continue
        yield rec
        if hang:
            print("hanging", flush=True)
            time.sleep(120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--hang-in-batch", type=int, default=-1)
    args = parser.parse_args(argv)
    with FaithfulnessDatabase(args.db, CONFIG) as db:
        for b in range(N_BATCHES):
            db.write(batch(db, b, hang=b == args.hang_in_batch))
            print(f"committed {b}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
