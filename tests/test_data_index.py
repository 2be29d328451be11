"""Bad index.csv input: every case exits non-zero through the CLI, names file + row + column,
and leaves no output (not even a temporary folder). Row numbers are CSV line numbers (header = 1).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from angioexp.cli import main
from angioexp.data.index import read_index
from angioexp.errors import InputError
from tests.helpers.study import write_study


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_rows(csv_path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(rows[0])
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _edit(csv_path: Path, row_number: int, **values) -> None:
    """Set cells of the data row on CSV line ``row_number`` (header = line 1)."""
    rows = _rows(csv_path)
    rows[row_number - 2].update(values)
    _write_rows(csv_path, rows)


def _case_file(csv_path: Path, row_number: int, column: str) -> Path:
    return csv_path.parent / _rows(csv_path)[row_number - 2][column]


# --- mutations: each returns (row, column, words expected in the message) -------------------


def missing_column(p):
    rows = _rows(p)
    _write_rows(p, rows, [c for c in rows[0] if c != "mask_path"])
    return 1, "mask_path", "missing"


def unknown_column(p):
    rows = _rows(p)
    for r in rows:
        r["segment_mask"] = r.pop("segment_mask_path")
    _write_rows(p, rows)
    return 1, "segment_mask", "did you mean 'segment_mask_path'"


def duplicate_header(p):
    p.write_text(p.read_text().replace("source,view", "source,source", 1))
    return 1, "source", "twice"


def unknown_split(p):
    _edit(p, 3, split="training")
    return 3, "split", "unknown split 'training'"


def duplicate_case(p):
    _edit(p, 4, case_id=_rows(p)[0]["case_id"])
    return 4, "case_id", "first used on row 2"


def patient_two_splits(p):
    rows = _rows(p)  # rows 2 and 3 (p0) are train; move row 3 to test
    rows[1]["split"] = "test"
    _write_rows(p, rows)
    return 3, "split", "one split"


def missing_file(p):
    _edit(p, 5, mask_path="masks/nothing.npy")
    return 5, "mask_path", "file not found"


def path_escape(p):
    outside = p.parent.parent / "outside.npy"
    np.save(outside, np.zeros((3, 48, 48), np.uint8))
    _edit(p, 3, cine_path="../outside.npy")
    return 3, "cine_path", "escapes"


def cine_wrong_ndim(p):
    np.save(_case_file(p, 3, "cine_path"), np.zeros((48, 48), np.uint8))
    return 3, "cine_path", "3-D"


def cine_wrong_dtype(p):
    np.save(_case_file(p, 4, "cine_path"), np.zeros((3, 48, 48), np.int32))
    return 4, "cine_path", "dtype int32"


def cine_nan(p):
    cine = np.full((3, 48, 48), 0.5, np.float32)
    cine[1, 5, 7] = np.nan  # frame_index is 1 (frames // 2)
    np.save(_case_file(p, 2, "cine_path"), cine)
    return 2, "cine_path", "NaN/Inf"


def frame_out_of_range(p):
    _edit(p, 6, frame_index="3")
    return 6, "frame_index", "out of range"


def frame_not_integer(p):
    _edit(p, 6, frame_index="1.5")
    return 6, "frame_index", "integer"


def mask_not_binary(p):
    mask = np.load(_case_file(p, 3, "mask_path"))
    mask[0, 0] = 2
    np.save(_case_file(p, 3, "mask_path"), mask)
    return 3, "mask_path", "not binary"


def mask_empty(p):
    np.save(_case_file(p, 4, "mask_path"), np.zeros((48, 48), np.uint8))
    return 4, "mask_path", "empty"


def gt_mask_aspect(p):
    gt = np.zeros((48, 24), np.uint8)
    gt[10, 10] = 1
    np.save(_case_file(p, 2, "gt_mask_path"), gt)
    return 2, "gt_mask_path", "aspect"


def truncated_npy(p):
    path = _case_file(p, 5, "cine_path")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return 5, "cine_path", "truncated"


def bad_angle(p):
    _edit(p, 3, primary_angle="400")
    return 3, "primary_angle", "outside the valid range"


def angle_not_number(p):
    _edit(p, 4, secondary_angle="CRA30")
    return 4, "secondary_angle", "expected a number"


def unsafe_case_id(p):
    _edit(p, 2, case_id="a/b")
    return 2, "case_id", "file name"


def empty_required(p):
    _edit(p, 7, patient_id="")
    return 7, "patient_id", "empty value"


def gt_partial_split(p):
    rows = _rows(p)
    rows[1]["gt_mask_path"] = ""  # row 3, train, while row 2 (train) has one
    _write_rows(p, rows)
    return 3, "gt_mask_path", "whole split"


STAGE1_CASES = [
    missing_column, unknown_column, duplicate_header, unknown_split, duplicate_case, patient_two_splits,
    missing_file, path_escape, cine_wrong_ndim, cine_wrong_dtype, cine_nan, frame_out_of_range,
    frame_not_integer, mask_not_binary, mask_empty, gt_mask_aspect, truncated_npy, bad_angle,
    angle_not_number, unsafe_case_id, empty_required, gt_partial_split,
]


def unknown_segment(p):
    seg = np.load(_case_file(p, 4, "segment_mask_path"))
    seg[0, 0] = 99
    np.save(_case_file(p, 4, "segment_mask_path"), seg)
    return 4, "segment_mask_path", "unknown segment id"


def segment_float(p):
    np.save(_case_file(p, 3, "segment_mask_path"), np.ones((48, 48), np.float32))
    return 3, "segment_mask_path", "integer labels"


def segment_missing_stage2(p):
    _edit(p, 5, segment_mask_path="")
    return 5, "segment_mask_path", "Stage 2"


STAGE2_CASES = [unknown_segment, segment_float, segment_missing_stage2]


@pytest.fixture()
def study(tmp_path) -> Path:
    return write_study(tmp_path / "study", cases=8, size=48, frames=3)


def _run_and_check(study_csv: Path, out: Path, stage: int, expected, capsys) -> str:
    row, column, words = expected
    rc = main(["convert", "--index", str(study_csv), "--out", str(out), "--stage", str(stage), "--workers", "1"])
    message = capsys.readouterr().err.strip()
    assert rc == 2, message
    assert "index.csv" in message and f"row {row}" in message and f"column '{column}'" in message, message
    assert words in message, message
    assert len(message.splitlines()) == 1  # one line, no traceback
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # no temporary folder left behind
    return message


@pytest.mark.parametrize("mutate", STAGE1_CASES, ids=lambda f: f.__name__)
def test_bad_index_stage1(mutate, study, tmp_path, capsys):
    expected = mutate(study)
    _run_and_check(study, tmp_path / "coco", 1, expected, capsys)


@pytest.mark.parametrize("mutate", STAGE2_CASES, ids=lambda f: f.__name__)
def test_bad_index_stage2(mutate, study, tmp_path, capsys):
    expected = mutate(study)
    _run_and_check(study, tmp_path / "coco", 2, expected, capsys)


def test_error_in_a_late_row_with_workers_leaves_nothing(tmp_path, capsys):
    """Parallel conversion that fails on its last row: first frames were written, then removed."""
    csv_path = write_study(tmp_path / "study", cases=30, size=32, frames=2)
    mask = np.load(_case_file(csv_path, 31, "mask_path"))
    mask[0, 0] = 7
    np.save(_case_file(csv_path, 31, "mask_path"), mask)
    out = tmp_path / "coco"
    rc = main(["convert", "--index", str(csv_path), "--out", str(out), "--stage", "1", "--workers", "2"])
    message = capsys.readouterr().err
    assert rc == 2 and "row 31" in message and "column 'mask_path'" in message
    assert not out.exists() and not list(tmp_path.glob(".coco.tmp-*"))


def test_read_index_accepts_valid_and_types_columns(study):
    df = read_index(study)
    assert df["frame_index"].dtype.kind == "i"
    assert df["primary_angle"].dtype.kind == "f"
    assert df["dominance"].isna().all()  # optional column absent from the CSV → None
    assert df.attrs["root"] == str(study.parent.resolve())


def test_blank_lines_keep_line_numbers(study):
    text = study.read_text().splitlines()
    text.insert(2, "")  # a blank line after row 2 shifts later rows by one line
    study.write_text("\n".join(text) + "\n")
    df = read_index(study)
    assert list(df["csv_row"])[:3] == [2, 4, 5]


def test_empty_and_header_only_csv(tmp_path):
    empty = tmp_path / "index.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty file"):
        read_index(empty)
    empty.write_text("case_id,patient_id,split,cine_path,frame_index,mask_path\n")
    with pytest.raises(InputError, match="no data rows"):
        read_index(empty)


def test_wrong_number_of_cells(study):
    lines = study.read_text().splitlines()
    lines[3] = lines[3] + ",extra"
    study.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as info:
        read_index(study)
    assert info.value.row == 4 and "values" in info.value.reason


def test_masks_stored_at_half_size_are_accepted(tmp_path):
    csv_path = write_study(tmp_path / "study", cases=4, size=48, mask_scale=0.5)
    read_index(csv_path)


def test_zero_255_masks_are_binary(study):
    path = _case_file(study, 2, "mask_path")
    np.save(path, np.load(path) * 255)
    read_index(study)


def test_symlink_escaping_the_folder_is_refused(study, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros((3, 48, 48), np.uint8))
    link = study.parent / "cines" / "link.npy"
    link.symlink_to(outside)
    _edit(study, 3, cine_path="cines/link.npy")
    with pytest.raises(InputError, match="escapes") as info:
        read_index(study)
    assert info.value.row == 3 and info.value.column == "cine_path"
    inside = study.parent / "cines" / "inside.npy"
    inside.symlink_to(study.parent / "cines" / "c000.npy")  # a link that stays inside is fine
    _edit(study, 3, cine_path="cines/inside.npy")
    assert read_index(study).iloc[1]["cine_path_abs"] == str(study.parent.resolve() / "cines" / "c000.npy")


def test_paths_with_dot_segments(study):
    _edit(study, 2, mask_path="masks/../masks/./c000.npy")
    assert read_index(study).iloc[0]["mask_path_abs"] == str(study.parent.resolve() / "masks" / "c000.npy")
