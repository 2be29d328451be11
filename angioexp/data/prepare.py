"""Data preparation: whatever ``cfg.data`` names → a COCO folder ready for training.

``prepare(cfg.data, stage)`` picks the first that applies:

1. ``data.coco_dir`` — validated (train/val splits readable, stage matches) and returned as is;
2. ``data.index_csv`` — converted to ``<cache_dir>/coco-s<stage>-<key>``, key = sha256 of the
   CSV's bytes, ``data.convert_size``, the converter's version and the size + mtime of every
   file the CSV references (an edited mask is a new dataset);
3. otherwise the embedded default: the synthetic study ``<cache_dir>/synth-<key>`` (key = the
   ``data.synth_*`` parameters + the generator's version and source code) is generated, then
   converted to ``<cache_dir>/coco-s<stage>-<key'>``.

A cache hit does no work. Each entry appears by an atomic rename once complete, and an
exclusive lock file (``<cache_dir>/.prepare.lock``) makes concurrent preparers (sweep workers)
wait for each other and then re-check the cache, so two processes never build the same entry.
``angioexp prepare`` is the command line (prints the COCO folder); ``--register`` also logs the
dataset to MLflow (:mod:`angioexp.data.register`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from angioexp.config import DataConfig, load_config, set_value, validate
from angioexp.errors import ConfigError, InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".prepare.lock"
COMPLETE_MARKER = "manifest.json"  # written last inside an atomic dir: present ⇒ entry complete


def _sha256_text(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def cache_lock(cache_dir: Path):
    """Exclusive inter-process lock on ``cache_dir`` (POSIX flock; released if the process dies)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames alone keep entries whole
        yield
        return
    with open(cache_dir / LOCK_NAME, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_complete(entry: Path) -> bool:
    return (entry / COMPLETE_MARKER).is_file()


def _remove_stale_temporaries(entry: Path) -> None:
    """Temporary folders of ``entry`` left by a killed preparer (call only under the lock)."""
    import shutil

    for leftover in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Cache keys


def index_cache_key(index_csv: Path, size: int | None) -> str:
    """Key of a converted index.csv: its bytes, the size, the converter, the referenced files' stats."""
    from angioexp.data.convert import CONVERTER_VERSION
    from angioexp.data.index import abs_column, read_table
    from angioexp.data.schema import PATH_COLUMNS

    df = read_table(index_csv)
    stats = []
    for column in PATH_COLUMNS:
        for path in df[abs_column(column)].dropna():
            st = os.stat(path)
            stats.append((os.path.relpath(path, df.attrs["root"]), st.st_size, st.st_mtime_ns))
    return _sha256_text(hashlib.sha256(index_csv.read_bytes()).hexdigest(), size, CONVERTER_VERSION, _source_sha("angioexp.data.convert"),
                        sorted(stats))[:16]


def _source_sha(module_name: str) -> str:
    """sha256 of a module's (or package's) Python source: code changes invalidate cached output."""
    import importlib.util

    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return "missing"
    locations = spec.submodule_search_locations
    files = sorted(Path(next(iter(locations))).rglob("*.py")) if locations else [Path(spec.origin)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def synth_cache_key(cfg_data: DataConfig) -> str:
    import angioexp.data.synthetic as synthetic

    version = getattr(synthetic, "GENERATOR_VERSION", getattr(synthetic, "__version__", None))
    return _sha256_text(cfg_data.synth_cases, cfg_data.synth_seed, cfg_data.synth_size, cfg_data.synth_frames,
                        version, _source_sha("angioexp.data.synthetic"))[:16]


# ---------------------------------------------------------------------------------------------
# The three sources


def validate_coco_dir(coco_dir: str | Path, stage: int, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Check that a given COCO folder has the splits training needs and matches ``stage``."""
    from angioexp.data.coco import CocoSplit

    coco_dir = Path(coco_dir).resolve()
    if not coco_dir.is_dir():
        raise ConfigError("COCO folder not found", file=coco_dir, key="data.coco_dir")
    manifest_path = coco_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("stage") not in (None, stage):
            raise ConfigError(f"this COCO folder was converted for Stage {manifest['stage']}, not Stage {stage}",
                              file=coco_dir, key="data.coco_dir")
    for split in splits:
        loaded = CocoSplit.load(coco_dir, split)
        if len(loaded) == 0:
            raise InputError(f"split {split!r} has no images", file=loaded.annotations_path)
        if stage == 1 and loaded.category_ids != [1]:
            raise ConfigError(f"Stage 1 expects one category (id 1), found {loaded.category_ids}",
                              file=loaded.annotations_path, key="data.coco_dir")
    return coco_dir


def _convert_cached(index_csv: Path, cache_dir: Path, stage: int, size: int | None, key: str,
                    workers: int | None) -> Path:
    from angioexp.data.convert import convert

    entry = cache_dir / f"coco-s{stage}-{key}"
    if _is_complete(entry):
        log.info("prepare: cache hit %s", entry)
        return entry
    with cache_lock(cache_dir):
        if _is_complete(entry):  # another preparer finished it while we waited
            return entry
        _remove_stale_temporaries(entry)
        log.info("prepare: converting %s (stage %d) → %s", index_csv, stage, entry)
        return convert(index_csv, entry, stage=stage, size=size, workers=workers, overwrite=entry.exists())


def prepare_synthetic(cfg_data: DataConfig, *, workers: int | None = None) -> Path:
    """The synthetic study of ``cfg_data.synth_*`` (generated once, cached); returns its folder."""
    from angioexp.data.synthetic import generate

    cache_dir = Path(cfg_data.cache_dir).resolve()
    entry = cache_dir / f"synth-{synth_cache_key(cfg_data)}"
    if _is_complete(entry):
        return entry
    with cache_lock(cache_dir):
        if not _is_complete(entry):
            _remove_stale_temporaries(entry)
            log.info("prepare: generating %d synthetic cases (%d px, %d frames) → %s",
                     cfg_data.synth_cases, cfg_data.synth_size, cfg_data.synth_frames, entry)
            generate(entry, cfg_data.synth_cases, cfg_data.synth_seed, size=cfg_data.synth_size,
                     frames=cfg_data.synth_frames, workers=workers, overwrite=entry.exists())
    return entry


def prepare(cfg_data: DataConfig, stage: int, *, register: bool = False, workers: int | None = None) -> Path:
    """The COCO folder for ``cfg_data`` and ``stage`` (see the module doc); cached, concurrency-safe."""
    if stage not in (1, 2):
        raise ConfigError(f"stage must be 1 or 2, got {stage!r}", key="stage")
    splits = (cfg_data.train_split, cfg_data.val_split)
    cache_dir = Path(cfg_data.cache_dir).resolve()
    if cfg_data.coco_dir:
        coco_dir = validate_coco_dir(cfg_data.coco_dir, stage, splits)
    elif cfg_data.index_csv:
        index_csv = Path(cfg_data.index_csv).resolve()
        key = index_cache_key(index_csv, cfg_data.convert_size)
        coco_dir = _convert_cached(index_csv, cache_dir, stage, cfg_data.convert_size, key, workers)
        coco_dir = validate_coco_dir(coco_dir, stage, splits)
    else:
        study = prepare_synthetic(cfg_data, workers=workers)
        key = _sha256_text(study.name, _source_sha("angioexp.data.convert"))[:16]
        coco_dir = _convert_cached(study / "index.csv", cache_dir, stage, None, key, workers)
    if register:
        from angioexp.data.register import register as register_dataset

        run_id, digest = register_dataset(coco_dir)
        log.info("prepare: registered dataset %s (run %s)", digest, run_id)
    return coco_dir


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--index", help="an index.csv to convert (default: the synthetic dataset)")
    source.add_argument("--coco", help="an existing COCO folder to validate and use")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--config", help="YAML config whose data section is used (flags override it)")
    parser.add_argument("--cases", type=int, help="synthetic cases (data.synth_cases)")
    parser.add_argument("--seed", type=int, help="synthetic seed (data.synth_seed)")
    parser.add_argument("--frames", type=int, help="synthetic frames per cine (data.synth_frames)")
    parser.add_argument("--size", type=int,
                        help="synthetic frame size (data.synth_size) or, with --index, the converted size")
    parser.add_argument("--cache-dir", help="where prepared datasets are cached (data.cache_dir)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes")
    parser.add_argument("--register", action="store_true", help="also log the dataset to MLflow")


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}", key="--workers")
    cfg = load_config(args.config, stage=args.stage)
    data = cfg.data
    # paths are assigned directly (not as key=value overrides) so no YAML parsing touches them
    if args.index:
        data.index_csv, data.coco_dir = args.index, None
    if args.coco:
        data.coco_dir = args.coco
    if args.cache_dir:
        data.cache_dir = args.cache_dir
    for flag, key in (("cases", "synth_cases"), ("seed", "synth_seed"), ("frames", "synth_frames")):
        if getattr(args, flag) is not None:
            set_value(cfg, f"data.{key}", getattr(args, flag), f"--{flag}")
    if args.size is not None:
        set_value(cfg, "data.convert_size" if data.index_csv else "data.synth_size", args.size, "--size")
    validate(cfg)
    coco_dir = prepare(data, cfg.stage, register=args.register, workers=args.workers)
    sys.stdout.write(f"{coco_dir}\n")
    return 0
