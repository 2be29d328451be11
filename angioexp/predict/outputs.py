"""What ``angioexp predict`` writes per frame and per cine: label maps, overlays, videos, tables."""

from __future__ import annotations

import colorsys
import importlib.util
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from angioexp.data.convert import encode_png_gray8
from angioexp.evaluate.masks import skeleton
from angioexp.fileio import write_bytes_atomic

OVERLAY_ALPHA = 0.6


def _palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: label 0 black, then well-separated hues (golden-ratio steps), bright."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for label in range(1, n):
        hue = (label * 0.618033988749895) % 1.0
        colours[label] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0)]
    return colours


PALETTE = _palette()


def label_png(labels: np.ndarray) -> bytes:
    """uint8 label map → palette PNG: pixel values are the labels, and it displays in colour."""
    image = Image.fromarray(labels.astype(np.uint8, copy=False), mode="P")
    image.putpalette(PALETTE.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def overlay(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """H×W uint8 frame + label map → H×W×3 uint8, labelled pixels tinted with their colour."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    hit = labels > 0
    if hit.any():
        tint = PALETTE[labels[hit]].astype(np.float32)
        rgb[hit] = ((1 - OVERLAY_ALPHA) * rgb[hit] + OVERLAY_ALPHA * tint).round().astype(np.uint8)
    return rgb


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _rgb_idat(rgb: np.ndarray) -> bytes:
    """The compressed scanlines of an RGB frame. An H×W×3 image has the bytes of an H×3W gray
    one, and the 'Up' filter works byte by byte on the line above: the converter's fast gray
    encoder (Up filter + Huffman-only deflate, ~3× faster than Pillow here) serves unchanged."""
    height, width, _ = rgb.shape
    encoded = encode_png_gray8(np.ascontiguousarray(rgb).reshape(height, 3 * width))
    # signature (8) + IHDR chunk (4 + 4 + 13 + 4) → the IDAT chunk: length, type, payload
    start = 8 + 25
    (length,) = struct.unpack(">I", encoded[start : start + 4])
    return encoded[start + 8 : start + 8 + length]


def _ihdr_rgb(height: int, width: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB


def png(rgb: np.ndarray) -> bytes:
    """H×W×3 uint8 → PNG bytes (see :func:`_rgb_idat`)."""
    height, width, _ = rgb.shape
    return b"\x89PNG\r\n\x1a\n" + _ihdr_rgb(height, width) + _chunk(b"IDAT", _rgb_idat(rgb)) + _chunk(b"IEND", b"")


def apng(frames_rgb: list[np.ndarray], fps: float) -> bytes:
    """Animated PNG (looping) of equally sized H×W×3 frames: the APNG chunks around the same
    fast scanline encoding; viewers without APNG support show the first frame."""
    height, width, _ = frames_rgb[0].shape
    delay = max(1, round(1000 / fps))
    parts = [b"\x89PNG\r\n\x1a\n", _ihdr_rgb(height, width), _chunk(b"acTL", struct.pack(">II", len(frames_rgb), 0))]
    sequence = 0
    for k, rgb in enumerate(frames_rgb):
        parts.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, delay, 1000, 0, 0)))
        sequence += 1
        data = _rgb_idat(rgb)
        if k == 0:
            parts.append(_chunk(b"IDAT", data))
        else:
            parts.append(_chunk(b"fdAT", struct.pack(">I", sequence) + data))
            sequence += 1
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def centreline_px(mask: np.ndarray) -> float:
    """Length of the mask's centreline in pixels: its skeleton's 8-connected links, diagonal
    links √2, a diagonal link dropped where the two pixels are also joined through a common
    4-neighbour (an L-shaped corner would otherwise count twice)."""
    skel = skeleton(mask.astype(bool))
    if not skel.any():
        return 0.0
    s = np.pad(skel, 1)
    centre = s[1:-1, 1:-1]
    right = centre & s[1:-1, 2:]
    down = centre & s[2:, 1:-1]
    down_right = centre & s[2:, 2:] & ~s[1:-1, 2:] & ~s[2:, 1:-1]
    down_left = centre & s[2:, :-2] & ~s[1:-1, :-2] & ~s[2:, 1:-1]
    return float(right.sum() + down.sum()) + math.sqrt(2) * float(down_right.sum() + down_left.sum())


def segment_rows(labels: np.ndarray, names: dict[int, str], scores: dict[int, float], spacing_mm: float | None) -> list[dict]:
    """One row per label present: pixel area, centreline length in px and (with spacing) mm."""
    rows = []
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=1))
    for label in present.tolist():
        if label == 0:
            continue
        mask = labels == label
        length = centreline_px(mask)
        rows.append({
            "label": label,
            "segment": names.get(label, str(label)),
            "score": round(scores.get(label, float("nan")), 4),
            "area_px": int(mask.sum()),
            "area_mm2": round(float(mask.sum()) * spacing_mm**2, 3) if spacing_mm else None,
            "centreline_px": round(length, 2),
            "centreline_mm": round(length * spacing_mm, 3) if spacing_mm else None,
        })
    return rows


def write_video(folder: Path, frames_rgb: list[np.ndarray], fps: float) -> Path:
    """An overlay video of a cine: MP4 (H.264) when imageio-ffmpeg is installed, else an
    animated PNG (lossless, plays in browsers)."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio_ffmpeg

        path = folder / "overlay.mp4"
        height, width = frames_rgb[0].shape[:2]
        even = (height + height % 2, width + width % 2)  # yuv420p needs even sides
        tmp = folder / ".overlay.mp4.tmp.mp4"
        writer = imageio_ffmpeg.write_frames(str(tmp), (even[1], even[0]), fps=fps, pix_fmt_in="rgb24",
                                             quality=8, macro_block_size=1, ffmpeg_log_level="error")
        writer.send(None)
        for rgb in frames_rgb:
            padded = np.zeros((*even, 3), dtype=np.uint8)
            padded[:height, :width] = rgb
            writer.send(padded)
        writer.close()
        tmp.replace(path)
        return path
    path = folder / "overlay_cine.png"
    write_bytes_atomic(path, apng(frames_rgb, fps))
    return path
