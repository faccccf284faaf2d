"""Data of the Teacher/Student workflow: the reference CSV layout and ShapesWorld notes, behind one
LightningDataModule.

CSV layout (the reference project's): ``<root>/metadata_{train,dev,test}.csv`` with an image
column (``file_path`` or ``img_path``: relative to `<root>`, or to ``<root>/images``), the
label columns (configurable; ``type`` and ``severity`` by default) and a ``description``. The
label vocabulary of each task is fixed from the training split (sorted values) and saved with the
checkpoint; a dev/test value outside it is an error naming the file, the row and the value, never
a silent class 0. The files are UTF-8 and parsed strictly (`read_metadata`): a repeated column
name, a row with more or fewer fields than the header, an empty cell or a label that is a
missing-value marker such as ``NaN`` is an error naming the file and the data row. Images are read
by `xclip.data.images`; an unreadable file is skipped and reported (``skipped_paths``).

Batches: ``{"image" [B,3,S,S] in [0,1], "text" [B] str, "labels" {task: [B] long}, "index" [B],
"skipped", "skipped_index", "skipped_paths"}`` (+ ``"path"`` for CSV rows; ``"mask"`` and
``"deciding_word"`` for ShapesWorld notes, the truth of the attribution measurements).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from xclip.data.image_folder import collate_skipping, unreadable_item
from xclip.data.images import load_image01
from xclip.data.sampling import eval_loader
from xclip.data.shapes import ShapesNotes

SPLIT_FILES = {"train": "metadata_train.csv", "val": "metadata_dev.csv", "test": "metadata_test.csv"}
IMAGE_COLUMNS = ("file_path", "img_path")
LabelVocabulary = dict[str, list[str]]


class CSVFormatError(ValueError):
    """A metadata CSV that does not fit the layout; the message names the file, the data row and its
    line (``data row 5 (line 6)``: the fifth row after the header, starting on line 6), and the field."""


# what pandas' read_csv reads as a missing value (its default na_values, less the empty string,
# which is refused as empty): as a label such a cell is a missing label, never a class
MISSING_VALUE_MARKERS = frozenset(
    {
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)


@dataclass
class CSVRecord:
    row: int  # 1-based among the data rows (the header is not one)
    line: int  # the file line the row starts on (the header is line 1)
    image: Path
    text: str
    labels: dict[str, str]

    @property
    def where(self) -> str:
        return f"data row {self.row} (line {self.line})"


def _undecodable(cell: str) -> str | None:
    """The first byte of `cell` that was not UTF-8 (decoded with ``surrogateescape``), as ``0xNN``."""
    bad = next((ch for ch in cell if "\udc80" <= ch <= "\udcff"), None)
    return None if bad is None else f"0x{ord(bad) - 0xDC00:02x}"


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(start line, cells) of every non-blank row of a UTF-8 CSV file (a byte-order mark is dropped;
    other bytes that are not UTF-8 are kept as surrogates and refused by the caller with their row)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            raise CSVFormatError(
                f"{path}, line {reader.line_num}: not valid CSV ({err}); quote values that "
                'contain commas, quotes or line breaks ("a, b"; a quote inside one is doubled)'
            ) from None
        if cells:
            rows.append((start, cells))


def read_metadata(
    path: Path, label_columns: Sequence[str], text_column: str = "description", image_column: str | None = None
) -> list[CSVRecord]:
    """The rows of one metadata CSV, parsed strictly: UTF-8; column names unique; every row has as
    many fields as the header (an unquoted comma in a value would shift or drop the rest of the
    row); no label, text or image cell empty; no label that is a missing-value marker (``NaN``,
    ``NA``, ``null``, ... as pandas reads them). Every error names the file and the data row."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such metadata file (expected metadata_train/dev/test.csv under the data root)"
        )
    rows = _csv_rows(path)
    if not rows:
        raise CSVFormatError(f"{path}: empty file (expected a header line and data rows)")
    header_line, header = rows[0]
    header = [name.strip() for name in header]
    for column in header:
        if _undecodable(column):
            raise CSVFormatError(
                f"{path}, line {header_line} (header): not UTF-8 (byte {_undecodable(column)}); "
                f"save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name}`)"
            )
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        where = "; ".join(f"{c!r} is columns {[i + 1 for i, h in enumerate(header) if h == c]}" for c in repeated)
        raise CSVFormatError(
            f"{path}, line {header_line} (header): repeated column name(s): {where}; rename or remove the repeats"
        )
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in header), None)
        if image_column is None:
            raise CSVFormatError(f"{path}: no image column; expected one of {list(IMAGE_COLUMNS)}, found {header}")
    needed = [image_column, text_column, *label_columns]
    missing = [c for c in needed if c not in header]
    if missing:
        raise CSVFormatError(
            f"{path}: missing column(s) {missing}; found {header} (set label_columns / text_column to the file's names)"
        )
    records = []
    for number, (line, cells) in enumerate(rows[1:], start=1):
        where = f"{path}, data row {number} (line {line})"
        if len(cells) != len(header):
            hint = (
                'an unquoted comma in a value? Quote values that contain commas ("a, b")'
                if len(cells) > len(header)
                else "a missing field?"
            )
            raise CSVFormatError(f"{where}: {len(cells)} fields, the header has {len(header)}: {hint}")
        row = dict(zip(header, cells))
        for column, value in row.items():
            if _undecodable(value):
                raise CSVFormatError(
                    f"{where}, column {column!r}: not UTF-8 (byte {_undecodable(value)}); save the "
                    f"file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name}`)"
                )
        for column in needed:
            if not row[column].strip():
                raise CSVFormatError(f"{where}: empty {column!r}")
        for column in label_columns:
            if row[column].strip() in MISSING_VALUE_MARKERS:
                raise CSVFormatError(
                    f"{where}: {column!r} is {row[column].strip()!r}, a missing-value marker (pandas "
                    "reads it as NaN), not a class: fill in the label or drop the row (a class "
                    "really named so needs another name)"
                )
        rel = Path(row[image_column].strip())
        image = rel if rel.is_absolute() else path.parent / rel
        if not rel.is_absolute() and not image.exists() and (path.parent / "images" / rel).exists():
            image = path.parent / "images" / rel
        records.append(
            CSVRecord(number, line, image, row[text_column].strip(), {c: row[c].strip() for c in label_columns})
        )
    if not records:
        raise CSVFormatError(f"{path}: no data rows (only a header)")
    return records


def label_vocabulary(records: Sequence[CSVRecord], label_columns: Sequence[str]) -> LabelVocabulary:
    """Each label column's classes (sorted values of the training rows)."""
    vocab = {c: sorted({r.labels[c] for r in records}) for c in label_columns}
    for column, classes in vocab.items():
        if len(classes) < 2:
            raise CSVFormatError(
                f"label column {column!r} has {len(classes)} value(s) in the training split "
                f"({classes}); a classifier needs at least 2"
            )
    return vocab


def encode_labels(
    records: Sequence[CSVRecord], vocab: LabelVocabulary, path: Path, source: str = "the training split's"
) -> list[dict[str, int]]:
    """Class ids of every row; a value outside the vocabulary is an error naming file, row and
    value, and whose classes they are (`source`, e.g. ``"the checkpoint xclip:...'s"``)."""
    index = {task: {name: i for i, name in enumerate(classes)} for task, classes in vocab.items()}
    out = []
    for r in records:
        ids = {}
        for task, lookup in index.items():
            value = r.labels[task]
            if value not in lookup:
                raise CSVFormatError(
                    f"{path}, {r.where}: unknown {task!r} label {value!r}; {source} {task!r} classes are {vocab[task]}"
                )
            ids[task] = lookup[value]
        out.append(ids)
    return out


class MetadataDataset(Dataset):
    """One split of the CSV layout: ``{"image", "text", "labels", "index", "path"}`` or an
    `unreadable_item`."""

    def __init__(self, records: Sequence[CSVRecord], labels: Sequence[dict[str, int]], root: Path, image_size: int):
        self.records, self.labels, self.root, self.image_size = list(records), list(labels), root, int(image_size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        rel = str(r.image.relative_to(self.root)) if r.image.is_relative_to(self.root) else str(r.image)
        image = load_image01(r.image, self.image_size)
        if image is None:
            return unreadable_item(index, rel)
        return {"image": image, "text": r.text, "labels": dict(self.labels[index]), "index": index, "path": rel}


class DistillDataModule(pl.LightningDataModule):
    """Image + text classification data for `TeacherModule` / `StudentModule`.

    Args:
        source: ``"shapes"`` (ShapesWorld notes, `ShapesNotes`: tasks ``shape`` decided by the image and
            ``background`` decided by the note) or ``"csv"`` (the reference layout under `data_root`).
        data_root, label_columns, text_column, image_column: the CSV layout (image column None:
            ``file_path`` or ``img_path``, whichever the file has).
        image_size: images are resized (shorter side) and centre-cropped to this size.
        seed, n_train, n_val, n_test: ShapesWorld sizes (validation uses ``seed + 1000``, test the
            disjoint test family of that seed).
    """

    def __init__(
        self,
        source: str = "shapes",
        data_root: str | None = None,
        label_columns: Sequence[str] = ("type", "severity"),
        text_column: str = "description",
        image_column: str | None = None,
        image_size: int = 64,
        seed: int = 0,
        n_train: int = 20_000,
        n_val: int = 500,
        n_test: int = 500,
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        super().__init__()
        if source not in ("shapes", "csv"):
            raise ValueError(f"source must be 'shapes' or 'csv', got {source!r}")
        if source == "csv" and not data_root:
            raise ValueError("source='csv' needs data_root (the folder with metadata_{train,dev,test}.csv)")
        self.source, self.data_root = source, Path(data_root) if data_root else None
        self.label_columns, self.text_column, self.image_column = list(label_columns), text_column, image_column
        self.image_size, self.seed = int(image_size), int(seed)
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self._records: dict[str, list[CSVRecord]] = {}
        self._vocabulary: LabelVocabulary | None = None
        self._vocabulary_source = ""

    # ---- the label vocabulary --------------------------------------------------------------------
    @property
    def label_vocabulary(self) -> LabelVocabulary:
        """Task -> class names: a checkpoint's (`use_label_vocabulary`), else this data's own
        (`data_vocabulary`)."""
        if self._vocabulary is None:
            self._vocabulary, self._vocabulary_source = self.data_vocabulary(), self._data_source()
        return self._vocabulary

    def _data_source(self) -> str:
        return "ShapesWorld's" if self.source == "shapes" else f"the training split's ({SPLIT_FILES['train']})"

    def data_vocabulary(self) -> LabelVocabulary:
        """This data's own classes: ShapesWorld's fixed ones, or the training split's values (sorted)."""
        if self.source == "shapes":
            return {t: list(c) for t, c in ShapesNotes.label_names.items()}
        return label_vocabulary(self._split_records("train"), self.label_columns)

    def use_label_vocabulary(
        self, vocab: Mapping[str, Sequence[str]], source: str = "the checkpoint's", check_order: bool = False
    ) -> None:
        """Encode labels with `vocab` (e.g. a checkpoint's) instead of this data's own classes.

        Args:
            source: whose classes they are, for messages (``"the checkpoint xclip:...'s"``).
            check_order: `vocab`'s order is not confirmed by a label fingerprint (a checkpoint
                saved before xclip stored one): it must equal this data's own vocabulary.
        """
        classes: LabelVocabulary = {str(t): [str(c) for c in names] for t, names in vocab.items()}
        expected = set(ShapesNotes.label_names) if self.source == "shapes" else set(self.label_columns)
        if set(classes) != expected:
            raise ValueError(f"{source} tasks {sorted(classes)} differ from this data's {sorted(expected)}")
        if self.source == "shapes" and classes != self.data_vocabulary():
            raise ValueError(f"{source} classes {classes} are not ShapesWorld's {ShapesNotes.label_names}")
        if check_order:
            try:
                own = self.data_vocabulary()
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"{source} classes carry no label fingerprint (saved before xclip stored one), "
                    f"so their order is checked against this data's training split: {err}"
                ) from None
            if own != classes:
                raise ValueError(
                    f"{source} classes {classes} differ from {self._data_source()} {own}, and no label "
                    "fingerprint was saved with them to confirm their order: the heads' outputs could be "
                    "read under the wrong names. Evaluate on data with the same classes, or re-export "
                    "the checkpoint (which stores a fingerprint)"
                )
        self._vocabulary, self._vocabulary_source = classes, source

    # ---- datasets --------------------------------------------------------------------------------
    @property
    def csv_root(self) -> Path:
        """`data_root` of the CSV layout (``source="csv"``, which __init__ refuses without one)."""
        if self.data_root is None:
            raise ValueError(f"source={self.source!r} reads no CSV files (only source='csv' with data_root does)")
        return self.data_root

    def _split_records(self, split: str) -> list[CSVRecord]:
        if split not in self._records:
            self._records[split] = read_metadata(
                self.csv_root / SPLIT_FILES[split], self.label_columns, self.text_column, self.image_column
            )
        return self._records[split]

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``train``, ``val`` (the CSV layout's dev) or ``test``."""
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        if self.source == "shapes":
            seed = self.seed if split == "train" else self.seed + 1000
            return ShapesNotes(self.sizes[split], seed=seed, image_size=self.image_size, split=split)
        records = self._split_records(split)
        vocab = self.label_vocabulary
        labels = encode_labels(records, vocab, self.csv_root / SPLIT_FILES[split], self._vocabulary_source)
        return MetadataDataset(records, labels, self.csv_root, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.source == "csv":  # read and check the files now: a bad file fails before any model runs
            for split in (
                ("train", "val") if stage in ("fit", None) else ("val", "test") if stage == "test" else ("val",)
            ):
                self._split_records(split)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset("train"),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_skipping,
        )

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.dataset("val"), self.batch_size, collate_skipping, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.dataset("test"), self.batch_size, collate_skipping, self.num_workers)
