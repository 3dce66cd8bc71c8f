"""Small previews of a position: max-intensity projections as an 8-bit grayscale PNG (pure numpy + zlib)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def mip(volume: np.ndarray, axis: int = 0) -> np.ndarray:
    """Maximum-intensity projection along ``axis`` (z by default)."""
    return np.asarray(volume).max(axis=axis)


def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.8) -> np.ndarray:
    """Linear contrast stretch between the ``low`` and ``high`` percentiles, to 0..255."""
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [low, high]) if img.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def downsample(image: np.ndarray, max_side: int = 256) -> np.ndarray:
    """Block-max downsampling so that the longer side is at most ``max_side`` pixels."""
    step = max(1, -(-max(image.shape) // max_side))
    if step == 1:
        return image
    h, w = (s // step * step for s in image.shape)
    if h == 0 or w == 0:
        return image[::step, ::step]
    return image[:h, :w].reshape(h // step, step, w // step, step).max(axis=(1, 3))


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Place uint8 images next to each other (top-aligned) with a white gap."""
    h = max(i.shape[0] for i in images)
    parts = []
    for n, img in enumerate(images):
        pad = np.zeros((h, img.shape[1]), dtype=np.uint8)
        pad[: img.shape[0]] = img
        parts.append(pad)
        if n < len(images) - 1:
            parts.append(np.full((h, gap), 255, dtype=np.uint8))
    return np.concatenate(parts, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit grayscale PNG."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + img[i].tobytes() for i in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def preview_png(volume: np.ndarray, dog: np.ndarray, max_side: int = 256) -> bytes:
    """PNG of the input's MIP (left) next to the DoG's MIP (right), each contrast-stretched."""
    return png_bytes(side_by_side(to_uint8(downsample(mip(volume), max_side)), to_uint8(downsample(mip(dog), max_side))))
