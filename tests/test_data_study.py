"""The tiny raw study of tests/helpers/study.py validates."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.study import write_study


def test_written_study_validates(tmp_path):
    from angioexp.data.index import read_index

    csv_path = write_study(tmp_path / "study", cases=8, mask_scale=0.5)
    df = read_index(csv_path, need_segments=True)
    assert list(df["csv_row"]) == list(range(2, 10))
    assert set(df["split"]) == {"train", "val", "test"}
    assert df["cine_path_abs"].map(lambda p: Path(p).is_absolute()).all()
