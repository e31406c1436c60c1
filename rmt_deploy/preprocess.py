"""The ImageNet evaluation transform of the spec, shared by the server, the parity gate and the
benchmarks so every backend sees identical pixels."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_MAX_PIXELS = 64_000_000
# Resizing the shorter side to S makes a thin image's longer side huge (a 95-byte 1x8000 PNG would
# become 256 x 2 million pixels): the aspect ratio and the resize target are bounded before resizing.
MAX_ASPECT_RATIO = 20.0
MAX_RESIZE_PIXELS = 25_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; the message is safe to show to a client."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than allowed (decompression-bomb guard)."""


class ImageShapeError(ImageDecodeError):
    """Proportions the preprocessing refuses: resizing would create far more pixels than the image has."""


def resize_size(size: int) -> int:
    """Shorter side before the centre crop: int(256/224 * S) at S = 224, S itself above."""
    return int(256 / 224 * size) if size <= 224 else size


def decode_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB: EXIF orientation applied, first frame of animations, grey/palette/RGBA/CMYK/
    16-bit converted. Raises `ImageDecodeError` with a client-safe message."""
    if isinstance(data, (bytes, bytearray)):
        if not data:
            raise ImageDecodeError("empty body: no image data")
        source = io.BytesIO(data)
    else:
        source = data
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise ImageTooLargeError(f"image has {img.width}x{img.height} pixels, above the limit of {max_pixels}")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image: the data is in no format Pillow can read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"broken image: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_target(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) the shorter side is resized to; `ImageShapeError` for an aspect ratio above
    MAX_ASPECT_RATIO or a target above MAX_RESIZE_PIXELS, checked before anything is allocated."""
    short = resize_size(size)
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageShapeError(f"image of {w}x{h} pixels has an aspect ratio above the limit of "
                              f"{MAX_ASPECT_RATIO:g}:1")
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if new_w * new_h > MAX_RESIZE_PIXELS:
        raise ImageShapeError(f"resizing {w}x{h} pixels for a {size} crop would make {new_w}x{new_h}, above "
                              f"the limit of {MAX_RESIZE_PIXELS} pixels")
    return new_w, new_h


def preprocess(img: Image.Image, size: int = 224) -> np.ndarray:
    """Resize (bicubic) the shorter side, centre-crop ``size``, scale to [0, 1], normalise: (3, S, S)."""
    new_w, new_h = resize_target(*img.size, size)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray(((arr - MEAN) / STD).transpose(2, 0, 1))


def load_images(paths, size: int = 224) -> np.ndarray:
    """Decode and preprocess files into one (N, 3, S, S) batch."""
    return np.stack([preprocess(decode_image(Path(p)), size) for p in paths])


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
