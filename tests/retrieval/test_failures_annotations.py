"""Annotation sheets, their validation (row-level errors), merge, report and the
``xclip annotations merge`` command."""

import csv
import json
from pathlib import Path

import pytest
from sklearn.metrics import cohen_kappa_score

from xclip.retrieval.cli import main
from xclip.retrieval.failures.annotations import (
    SheetError,
    consensus,
    merge_annotations,
    read_merged_labels,
    read_sheet_dir,
)
from xclip.retrieval.failures.extract import Failure, failure_id
from xclip.retrieval.failures.report import write_annotation_report
from xclip.retrieval.failures.sheets import SHEET_COLUMNS, assign_sheets, feasible_counts, fill_sheets, write_sheets

N_ANNOTATORS, PER_ANNOTATOR, OVERLAP = 3, 4, 5


def make_failures(n: int) -> list[Failure]:
    return [
        Failure(
            failure_id(t),
            t,
            f"caption {t}",
            t // 2,
            f"img{t // 2}",
            (t // 2 + 1) % 50,
            f"img{(t // 2 + 1) % 50}",
            0.5,
            0.6,
            1 + t % 3,
        )
        for t in range(0, 2 * n, 2)
    ]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict], columns=None) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def sheets(tmp_path):
    """Empty sheets for 3 annotators x 4 own + 5 shared failures out of 30, with card files."""
    failures = make_failures(30)
    cards = {}
    for f in failures:
        cards[f.failure_id] = tmp_path / "cards" / f"{f.failure_id}.png"
        cards[f.failure_id].parent.mkdir(exist_ok=True)
        cards[f.failure_id].write_bytes(b"png")
    assignment = assign_sheets([f.failure_id for f in failures], N_ANNOTATORS, PER_ANNOTATOR, OVERLAP, seed=0)
    write_sheets(tmp_path / "sheets", failures, assignment, cards)
    return tmp_path / "sheets", assignment, failures


# ---- assignment and sheets ---------------------------------------------------------------------
def test_assignment_counts_overlap_and_disjoint_own_items():
    ids = [failure_id(t) for t in range(40)]
    a = assign_sheets(ids, N_ANNOTATORS, PER_ANNOTATOR, OVERLAP, seed=7)
    assert list(a.sheets) == ["annotator_1", "annotator_2", "annotator_3"]
    assert all(len(rows) == PER_ANNOTATOR + OVERLAP for rows in a.sheets.values())
    assert len(a.overlap) == OVERLAP and all(set(a.overlap) <= set(rows) for rows in a.sheets.values())
    own = [set(rows) - set(a.overlap) for rows in a.sheets.values()]
    assert all(len(o) == PER_ANNOTATOR for o in own)
    assert len(set.union(*own)) == N_ANNOTATORS * PER_ANNOTATOR  # disjoint
    assert assign_sheets(ids, N_ANNOTATORS, PER_ANNOTATOR, OVERLAP, seed=7) == a  # seeded
    assert assign_sheets(ids, N_ANNOTATORS, PER_ANNOTATOR, OVERLAP, seed=8) != a
    # shared rows are interleaved, not a block at the top of every sheet
    assert any(rows[:OVERLAP] != a.overlap and set(rows[:OVERLAP]) != set(a.overlap) for rows in a.sheets.values())


def test_assignment_needs_enough_failures_and_counts_can_be_shrunk():
    with pytest.raises(ValueError, match="need 17 failures, only 16"):
        assign_sheets([failure_id(t) for t in range(16)], N_ANNOTATORS, PER_ANNOTATOR, OVERLAP, seed=0)
    assert feasible_counts(16, 3, 4, 5) == (3, 5)
    assert feasible_counts(4, 3, 4, 5) == (0, 4)
    assert feasible_counts(100, 3, 4, 5) == (4, 5)


def test_sheets_have_one_row_per_assigned_failure_tied_to_its_card(sheets):
    sheet_dir, assignment, failures = sheets
    by_id = {f.failure_id: f for f in failures}
    files = sorted(p.name for p in sheet_dir.iterdir())
    assert files == ["annotator_1.csv", "annotator_2.csv", "annotator_3.csv", "assignment.json", "taxonomy.txt"]
    for name, ids in assignment.sheets.items():
        rows = read_rows(sheet_dir / f"{name}.csv")
        assert list(rows[0]) == list(SHEET_COLUMNS)
        assert [r["failure_id"] for r in rows] == ids
        for r in rows:
            f = by_id[r["failure_id"]]
            assert (sheet_dir / r["card"]).resolve() == (sheet_dir.parent / "cards" / f"{f.failure_id}.png").resolve()
            assert (r["caption"], r["gt_key"], r["retrieved_key"], int(r["text_index"])) == (
                f.caption,
                f.gt_key,
                f.retrieved_key,
                f.text_index,
            )
            assert r["label"] == "" and r["note"] == ""
    saved = json.loads((sheet_dir / "assignment.json").read_text())
    assert saved == {"sheets": assignment.sheets, "overlap": assignment.overlap}
    assert "amb-n" in (sheet_dir / "taxonomy.txt").read_text()


# ---- merge and report --------------------------------------------------------------------------
def fill(sheet_dir: Path, out_dir: Path, labels: dict[str, dict[str, str]]) -> Path:
    fill_sheets(sheet_dir, labels, out_dir)
    return out_dir


def label_everything(assignment, spelling_of) -> dict[str, dict[str, str]]:
    return {name: {fid: spelling_of(name, fid) for fid in ids} for name, ids in assignment.sheets.items()}


def test_report_counts_agreement_and_summary(sheets, tmp_path):
    sheet_dir, assignment, _ = sheets
    truth = {
        fid: ["Object", "spat", "Attribute", "amb-n", "Count"][int(fid[1:]) // 2 % 5]
        for ids in assignment.sheets.values()
        for fid in ids
    }
    disputed = assignment.overlap[0]  # annotator_3 disagrees on one shared failure

    def spelling(name, fid):
        return "ctx" if (name, fid) == ("annotator_3", disputed) else truth[fid]

    filled = fill(sheet_dir, tmp_path / "filled", label_everything(assignment, spelling))
    report = write_annotation_report(filled, tmp_path / "report")
    n_unique = N_ANNOTATORS * PER_ANNOTATOR + OVERLAP
    assert report["n_failures"] == n_unique and report["n_annotations"] == N_ANNOTATORS * (PER_ANNOTATOR + OVERLAP)
    assert report["rows_per_annotator"] == {f"annotator_{k}": PER_ANNOTATOR + OVERLAP for k in (1, 2, 3)}

    merged = read_rows(tmp_path / "report" / "merged.csv")
    assert len(merged) == n_unique
    shared = [r for r in merged if r["failure_id"] in assignment.overlap]
    assert len(shared) == OVERLAP and all(r["n_annotators"] == "3" for r in shared)
    dispute = next(r for r in merged if r["failure_id"] == disputed)
    assert dispute["n_agree"] == "2" and dispute["label_annotator_3"] == "Context"
    assert dispute["label"] == {"spat": "Spatial", "amb-n": "Ambiguous/nearduplicate"}.get(
        truth[disputed], truth[disputed]
    )
    assert all((tmp_path / "report" / r["card"]).is_file() for r in merged)  # card links still resolve

    rows = read_rows(tmp_path / "report" / "agreement.csv")
    assert {r["level"] for r in rows} == {"category", "label"}
    agreement = {r["annotators"]: r for r in rows if r["level"] == "category"}
    assert set(agreement) == {"annotator_1+annotator_2", "annotator_1+annotator_3", "annotator_2+annotator_3", "all"}
    assert float(agreement["annotator_1+annotator_2"]["kappa"]) == 1.0
    cats = {"spat": "Spatial", "amb-n": "Ambiguous"}
    a = [cats.get(truth[f], truth[f]) for f in sorted(assignment.overlap)]
    b = ["Context" if f == disputed else x for f, x in zip(sorted(assignment.overlap), a)]
    assert float(agreement["annotator_1+annotator_3"]["kappa"]) == pytest.approx(cohen_kappa_score(a, b), abs=1e-9)
    assert int(agreement["all"]["n_items"]) == OVERLAP
    assert float(agreement["all"]["kappa"]) < 1.0
    # on full labels the Ambiguous subtypes count apart (here every annotator used the same subtype)
    by_label = {r["annotators"]: r for r in rows if r["level"] == "label"}
    full = [
        {"spat": "Spatial", "amb-n": "Ambiguous/nearduplicate"}.get(truth[f], truth[f])
        for f in sorted(assignment.overlap)
    ]
    full_b = ["Context" if f == disputed else x for f, x in zip(sorted(assignment.overlap), full)]
    assert float(by_label["annotator_1+annotator_3"]["kappa"]) == pytest.approx(
        cohen_kappa_score(full, full_b), abs=1e-9
    )
    assert report["n_ties"] == 0

    distribution = {r["label"]: int(r["count"]) for r in read_rows(tmp_path / "report" / "distribution.csv")}
    assert sum(distribution.values()) == n_unique
    consensus_labels = [r["label"] for r in merged]
    assert distribution == {label: consensus_labels.count(label) for label in distribution}
    ambiguity = read_rows(tmp_path / "report" / "ambiguity.csv")[0]
    n_amb = sum(label.startswith("Ambiguous") for label in consensus_labels)
    assert int(ambiguity["ambiguous"]) == n_amb and int(ambiguity["clear"]) == n_unique - n_amb
    assert float(ambiguity["ambiguous_to_clear"]) == pytest.approx(n_amb / (n_unique - n_amb))
    assert (tmp_path / "report" / "distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert read_merged_labels(tmp_path / "report" / "merged.csv") == {int(r["text_index"]): r["label"] for r in merged}


def test_consensus_is_the_majority_and_a_tie_stays_a_tie():
    assert consensus(["Object", "Spatial", "Object"]) == ("Object", ())
    assert consensus(["Object", "Spatial"]) == (None, ("Spatial", "Object"))  # tied labels in taxonomy order
    assert consensus(["Count", "Ambiguous/nearduplicate"]) == (None, ("Ambiguous/nearduplicate", "Count"))
    assert consensus(["Count", "Count", "Object", "Object", "Spatial"]) == (None, ("Count", "Object"))


def test_ties_are_reported_not_resolved_as_ambiguous(sheets, tmp_path):
    sheet_dir, assignment, _ = sheets
    names = sorted(assignment.sheets)
    shared = sorted(assignment.overlap)

    def spelling(name, fid):  # the shared failures split 2 : 1 except the first, where 3 annotators disagree
        if fid == shared[0]:
            return {names[0]: "amb-u", names[1]: "obj", names[2]: "cnt"}[name]
        return "obj"

    filled = fill(sheet_dir, tmp_path / "filled", label_everything(assignment, spelling))
    report = write_annotation_report(filled, tmp_path / "report")
    assert report["n_ties"] == 1 and report["ties"] == {shared[0]: ["Ambiguous/underspecified", "Count", "Object"]}
    row = next(r for r in read_rows(tmp_path / "report" / "merged.csv") if r["failure_id"] == shared[0])
    assert row["label"] == "" and row["category"] == "" and row["tie"] == "Ambiguous/underspecified | Count | Object"
    # the tie does not become Ambiguous: nothing is ambiguous, the tie is left out of the ratio
    assert report["ambiguity"]["ambiguous"] == 0 and report["ambiguity"]["n_failures"] == report["n_failures"] - 1
    assert shared[0] not in {str(k) for k in read_merged_labels(tmp_path / "report" / "merged.csv")}


# ---- validation errors -------------------------------------------------------------------------
def filled_copy(sheets, tmp_path) -> tuple[Path, dict]:
    sheet_dir, assignment, _ = sheets
    return fill(sheet_dir, tmp_path / "filled", label_everything(assignment, lambda n, f: "obj")), assignment


def test_unknown_and_empty_labels_are_reported_with_file_row_and_value(sheets, tmp_path):
    filled, _ = filled_copy(sheets, tmp_path)
    path = filled / "annotator_2.csv"
    rows = read_rows(path)
    rows[1]["label"] = "colour"  # file row 3
    rows[4]["label"] = "   "  # file row 6
    write_rows(path, rows)
    with pytest.raises(SheetError) as err:
        read_sheet_dir(filled)
    issues = [(Path(i.file).name, i.row, i.column, i.value, i.problem) for i in err.value.issues]
    assert issues == [
        ("annotator_2.csv", 3, "label", "colour", "unknown label"),
        ("annotator_2.csv", 6, "label", "", "missing label"),
    ]
    message = str(err.value)
    assert f"{path}, row 3, column 'label', value 'colour': unknown label" in message
    assert f"{path}, row 6, column 'label', value '': missing label" in message


def test_missing_column_duplicate_id_and_missing_row_are_all_collected(sheets, tmp_path):
    filled, assignment = filled_copy(sheets, tmp_path)
    rows1 = read_rows(filled / "annotator_1.csv")
    write_rows(filled / "annotator_1.csv", [{k: v for k, v in r.items() if k != "label"} for r in rows1])
    rows2 = read_rows(filled / "annotator_2.csv")
    dropped = rows2.pop()  # an assigned failure loses its row
    rows2.append(dict(rows2[0]))  # and the first failure appears twice (file row 10)
    write_rows(filled / "annotator_2.csv", rows2)
    with pytest.raises(SheetError) as err:
        read_sheet_dir(filled)
    issues = [(Path(i.file).name, i.row, i.column, i.value, i.problem) for i in err.value.issues]
    assert issues[0][:4] == ("annotator_1.csv", 1, "label", "") and issues[0][4].startswith("missing column")
    assert issues[1] == (
        "annotator_2.csv",
        10,
        "failure_id",
        rows2[0]["failure_id"],
        "duplicate failure id (first at row 2)",
    )
    assert issues[2] == (
        "annotator_2.csv",
        0,
        "failure_id",
        dropped["failure_id"],
        "assigned failure has no row in this sheet",
    )
    assert len(issues) == 3  # no per-row noise for the sheet without a label column


def test_a_row_not_assigned_to_its_annotator_is_an_error_naming_sheet_and_row(sheets, tmp_path):
    filled, assignment = filled_copy(sheets, tmp_path)
    own_of_2 = sorted(set(assignment.sheets["annotator_2"]) - set(assignment.overlap))[0]
    rows = read_rows(filled / "annotator_1.csv")
    rows.append({**rows[0], "failure_id": own_of_2})  # annotator_1 labels one of annotator_2's failures (row 12+)
    write_rows(filled / "annotator_1.csv", rows)
    with pytest.raises(SheetError) as err:
        read_sheet_dir(filled)
    (issue,) = err.value.issues
    assert (Path(issue.file).name, issue.row, issue.column, issue.value) == (
        "annotator_1.csv",
        len(rows) + 1,
        "failure_id",
        own_of_2,
    )
    assert issue.problem == "failure not assigned to annotator_1 in assignment.json"


def test_missing_sheet_is_reported(sheets, tmp_path):
    filled, _ = filled_copy(sheets, tmp_path)
    (filled / "annotator_3.csv").unlink()
    with pytest.raises(SheetError, match=r"annotator_3.csv, row 0.*sheet missing"):
        read_sheet_dir(filled)


def test_merge_keeps_notes_and_metadata(sheets, tmp_path):
    filled, assignment = filled_copy(sheets, tmp_path)
    rows = read_rows(filled / "annotator_1.csv")
    rows[0]["note"] = "two objects overlap"
    write_rows(filled / "annotator_1.csv", rows)
    merged = {m.failure_id: m for m in merge_annotations(read_sheet_dir(filled))}
    assert merged[rows[0]["failure_id"]].notes == {"annotator_1": "two objects overlap"}
    assert merged[rows[0]["failure_id"]].meta["caption"] == rows[0]["caption"]
    assert all(m.label == "Object" for m in merged.values())


# ---- command -----------------------------------------------------------------------------------
def test_merge_command_writes_the_report(sheets, tmp_path, capsys):
    filled, _ = filled_copy(sheets, tmp_path)
    assert main(["merge", "--sheets", str(filled), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert (
        f"{N_ANNOTATORS * PER_ANNOTATOR + OVERLAP} failures, {N_ANNOTATORS * (PER_ANNOTATOR + OVERLAP)} labels" in out
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "agreement.csv",
        "ambiguity.csv",
        "distribution.csv",
        "distribution.png",
        "merged.csv",
        "report.json",
    ]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # every label is Object: chance agreement is 1, kappa undefined -> null in strict JSON
    assert report["agreement"][-1] == {
        "level": "label",
        "method": "fleiss",
        "annotators": "all",
        "n_items": OVERLAP,
        "observed": "",
        "kappa": None,
    }


def test_merge_command_reports_bad_rows_and_exits_1(sheets, tmp_path, capsys):
    filled, _ = filled_copy(sheets, tmp_path)
    rows = read_rows(filled / "annotator_1.csv")
    rows[2]["label"] = "Atribute"
    write_rows(filled / "annotator_1.csv", rows)
    assert main(["merge", "--sheets", str(filled), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{filled / 'annotator_1.csv'}, row 4, column 'label', value 'Atribute': unknown label" in err
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["merge", "--sheets", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    assert "no annotation sheets" in capsys.readouterr().err
