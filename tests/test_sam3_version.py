"""The sam3 release the backend is written against is pinned and checked at start."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from tests.helpers.skips import SAM3_MISSING

pytest.importorskip("sam3", reason=SAM3_MISSING)

import angioexp.backends.sam3 as backend  # noqa: E402
from angioexp.config import load_config  # noqa: E402
from angioexp.errors import InputError  # noqa: E402

pytestmark = pytest.mark.sam3


def test_the_extra_pins_the_supported_release():
    extra = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["sam3"]
    pins = [re.sub(r"\s", "", r) for r in extra if r.startswith("sam3")]
    assert pins == [f"sam3=={backend.SUPPORTED_SAM3}"]


def test_installed_release_is_the_supported_one():
    assert backend.sam3_version() == backend.SUPPORTED_SAM3
    backend.check_sam3_version()


@pytest.mark.parametrize("installed", ["0.1.3", "0.2.0", None])
def test_another_release_is_one_line_naming_the_supported_one(monkeypatch, installed):
    monkeypatch.setattr(backend, "sam3_version", lambda: installed)
    with pytest.raises(InputError) as info:
        backend.check_sam3_version()
    message = str(info.value)
    assert "\n" not in message and f"sam3=={backend.SUPPORTED_SAM3}" in message and info.value.key == "backend"
    assert (installed or "version unknown") in message


def test_train_stops_before_anything_is_written(monkeypatch, tmp_path):
    from angioexp.backends.sam3.run import train_sam3

    monkeypatch.setattr(backend, "sam3_version", lambda: "0.2.0")
    cfg = load_config(overrides=["backend=sam3", "scratch.resolution=336", "train.device=cpu"])
    with pytest.raises(InputError, match="sam3==0.1.4"):
        train_sam3(cfg, argparse.Namespace(out=str(tmp_path / "run"), coco_dir=str(tmp_path / "nowhere")))
    assert not (tmp_path / "run").exists()
