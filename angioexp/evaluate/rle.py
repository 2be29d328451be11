"""Checking COCO segmentations before pycocotools sees them.

pycocotools decodes run-length encodings in C without bounds checks: a compressed ``counts``
string whose runs do not add up to height×width decodes to garbage (or writes past its
buffer). So every RLE that reaches the evaluator is checked here first, vectorised: the
compressed string is parsed with numpy (COCO's LEB128-like format, 5 data bits per character
offset by 48, bit 0x20 = more characters follow, bit 0x10 of the last one = sign, and runs from
the fourth on stored as a difference to the run two before).
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils

from angioexp.errors import InputError

_MAX_CHARS_PER_VALUE = 12  # 60 bits: far beyond any real run length, keeps int64 shifts exact


def counts_from_string(counts: str | bytes) -> np.ndarray:
    """Run lengths (int64, may be negative if the string is corrupt) of a compressed RLE.

    Raises ValueError for characters outside COCO's alphabet or a truncated last value.
    """
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    if not raw:
        return np.zeros(0, dtype=np.int64)
    chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("characters outside the COCO RLE alphabet ('0'..'o')")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise ValueError("truncated: the last value is unfinished")
    ends = ~more
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    group = np.cumsum(np.concatenate([[0], ends[:-1].astype(np.int64)]))
    position = np.arange(chars.size) - starts[group]
    if position.max() >= _MAX_CHARS_PER_VALUE:
        raise ValueError("a run length is absurdly long")
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    lengths = np.diff(np.concatenate([starts, [chars.size]]))
    negative = (chars[ends] & 0x10) != 0
    values = values - np.where(negative, np.left_shift(1, 5 * lengths), 0)
    # Runs 3, 4, 5 … are stored as differences to the run two places before.
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def check_rle(segmentation, height: int, width: int, *, where: str, file=None) -> dict:
    """Validate one RLE segmentation and return it compressed: {"size": [h, w], "counts": str}.

    Accepts compressed (str/bytes counts) and uncompressed (list counts) RLE; ``where`` names
    the item in error messages (e.g. "prediction 17 (image_id 3)").
    """
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise InputError(f"{where}: segmentation must be an RLE object with 'size' and 'counts'", file=file)
    size = segmentation["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise InputError(f"{where}: RLE 'size' must be [height, width], got {size!r}", file=file)
    if list(size) != [height, width]:
        raise InputError(f"{where}: RLE size {list(size)} does not match the image's [{height}, {width}]", file=file)
    counts = segmentation["counts"]
    if isinstance(counts, list):
        runs = np.asarray(counts)
        if runs.ndim != 1 or (runs.size and not np.issubdtype(runs.dtype, np.integer)):
            raise InputError(f"{where}: uncompressed RLE counts must be a list of integers", file=file)
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": [int(v) for v in counts]}, height, width)
    elif isinstance(counts, (str, bytes)):
        try:
            runs = counts_from_string(counts)
        except (ValueError, UnicodeEncodeError) as exc:
            raise InputError(f"{where}: malformed RLE counts: {exc}", file=file) from None
        compressed = {"size": [height, width], "counts": counts}
    else:
        raise InputError(f"{where}: RLE counts must be a string or a list, got {type(counts).__name__}", file=file)
    if runs.size and runs.min() < 0:
        raise InputError(f"{where}: malformed RLE counts: negative run length", file=file)
    total = int(runs.sum()) if runs.size else 0
    if total != height * width:
        raise InputError(
            f"{where}: malformed RLE counts: runs cover {total} pixels, the image has {height}×{width} = {height * width}",
            file=file,
        )
    text = compressed["counts"]
    return {"size": [height, width], "counts": text.decode("ascii") if isinstance(text, bytes) else text}


def polygon_to_rle(polygons, height: int, width: int, *, where: str, file=None) -> dict:
    """COCO polygon list → compressed RLE (ground truth may come as polygons, e.g. from ARCADE)."""
    try:
        flat = [[float(v) for v in poly] for poly in polygons]
    except (TypeError, ValueError):
        raise InputError(f"{where}: polygon segmentation must be a list of coordinate lists", file=file) from None
    if not flat or any(len(poly) < 6 or len(poly) % 2 for poly in flat):
        raise InputError(f"{where}: each polygon needs at least 3 (x, y) points", file=file)
    merged = mask_utils.merge(mask_utils.frPyObjects(flat, height, width))
    return {"size": [height, width], "counts": merged["counts"].decode("ascii")}


def encode(mask: np.ndarray) -> dict:
    """bool (H, W) mask → compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    """Compressed or uncompressed RLE → bool (H, W) mask. Check untrusted input with
    :func:`check_rle` first.

    The array is in Fortran order, as pycocotools decodes it (a C-order copy of a 512² frame
    costs more than the decode itself); every measure here accepts either order.
    """
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    return mask_utils.decode(rle).view(bool)
