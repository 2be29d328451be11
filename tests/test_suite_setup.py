"""How the suite is spread over xdist workers (tests/conftest.py)."""

from __future__ import annotations

from tests import conftest


def test_a_file_is_one_unit_and_the_files_sharing_the_postgres_database_are_one():
    unit = conftest.scheduling_unit
    assert unit("tests/test_a.py::test_one") == unit("tests/test_a.py::test_two[x::y]") == "tests/test_a.py"
    assert unit("tests/test_sweep_run.py::test_postgresql_sweep_with_two_workers") \
        == unit("tests/test_sweep_storage.py::test_postgresql_storage_heartbeats_and_lock") \
        != unit("tests/test_sweep_space.py::test_x")
    assert conftest.SHARED_POSTGRES_DATABASE <= {f"tests/{p.name}" for p in conftest.REPO_ROOT.glob("tests/test_*.py")}

