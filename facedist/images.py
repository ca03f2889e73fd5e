"""Image bytes -> RGB uint8 array, with one error type and a message that says what is wrong.

Every stage decodes through decode_image so a corrupt upload, a text file named .jpg or an
8000x8000 scan behave the same in the batch job, the trainer and the server. The format is
sniffed from the content (Yale's files have no extension). Pillow decodes first (it knows EXIF,
palettes, 16-bit and can reduce JPEGs while decoding); OpenCV is the fallback for what Pillow
cannot open.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Smaller than this cannot hold a face any detector finds; reject early with a clear message.
MIN_SIDE = 16
# Refuse images whose full-resolution decode would need more pixels than this (~380 MB as RGB;
# 8000x8000 = 64 M is fine). JPEGs are exempt up to PILLOW_OPEN_LIMIT: they are reduced by 1/2, 1/4
# or 1/8 while decoding (draft), and the reduced size must fit MAX_PIXELS.
MAX_PIXELS = 128_000_000
PILLOW_OPEN_LIMIT = 512_000_000

# Magic numbers -> format name, to say "truncated or corrupt JPEG" rather than "unknown".
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

_EXIF_ORIENTATION = 0x0112

# Pillow refuses (DecompressionBombError) images above 2 * MAX_IMAGE_PIXELS already in
# Image.open, before a JPEG could be drafted down. Raise its limit so huge JPEGs decode reduced,
# while other huge formats get our own "image too large" error (MAX_PIXELS) below.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PILLOW_OPEN_LIMIT:
    Image.MAX_IMAGE_PIXELS = PILLOW_OPEN_LIMIT


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; the message says why."""


def content_hash(data: bytes) -> str:
    """sha1 hex of the raw bytes: with the path, the resume key of a job."""
    return hashlib.sha1(data).hexdigest()


def sniff_format(data: bytes) -> str | None:
    """Image format from the first bytes, or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the 4096-byte boundary is still text.
        if exc.start < len(head) - 4:
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * max(len(text), 1)


def _describe_unreadable(data: bytes, detail: str) -> str:
    fmt = sniff_format(data)
    if fmt is not None:
        return f"truncated or corrupt {fmt}: {detail}"
    if _looks_like_text(data):
        stripped = data[:256].lstrip().lower()
        kind = "HTML" if stripped.startswith((b"<!doctype html", b"<html")) else "text"
        return f"not an image: looks like {kind} ({len(data)} bytes)"
    return f"not an image: unrecognised format (first bytes {data[:8].hex()}, {len(data)} bytes)"


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale integer / float samples to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit data (PNG/TIFF "I;16" or "I" holding 16-bit values): full range is 0..65535.
        top = 65535.0 if arr.size and int(arr.max()) > 255 else 255.0
        return np.clip(arr.astype(np.float32) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    arr = arr.astype(np.float32)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:
        scale, lo = 255.0, 0.0
    elif lo >= 0.0 and hi <= 255.0:
        scale, lo = 1.0, 0.0
    else:
        scale = 255.0 / max(hi - lo, 1e-12)
    arr = np.nan_to_num((arr - lo) * scale, nan=0.0)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white (faces on white, not black)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("RGB",):
        return img
    if img.mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    # I;16*, I, F: scale the samples ourselves (Pillow's convert clips instead of scaling).
    gray = _to_uint8(np.asarray(img))
    if gray.ndim == 3:
        gray = gray[..., 0]
    return Image.fromarray(gray, mode="L").convert("RGB")


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return img.transpose(method) if method is not None else img


def _decode_pillow(data: bytes, max_side: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        try:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # a broken EXIF block must not lose an otherwise good image
            orientation = 1
        if img.format == "JPEG" and max(width, height) > max_side:
            # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT: huge JPEGs never
            # materialise at full size.
            img.draft("RGB", (max_side, max_side))
        reduced_w, reduced_h = img.size
        if reduced_w * reduced_h > MAX_PIXELS:
            raise ImageDecodeError(
                f"image too large: {width}x{height} ({width * height} pixels, limit {MAX_PIXELS})")
        img.load()
        img = _pil_to_rgb(img)
        if max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        img = _apply_orientation(img, orientation)
        return np.asarray(img)


def _decode_opencv(data: bytes, max_side: int) -> np.ndarray:
    import cv2  # imported lazily: only the fallback path needs it

    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # applies EXIF orientation, 8-bit BGR
    if bgr is None:
        raise ImageDecodeError("OpenCV could not decode it")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        size = (max(1, min(max_side, round(w * f))), max(1, min(max_side, round(h * f))))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb


def decode_image(data: bytes, *, max_side: int = 2048) -> np.ndarray:
    """Decode image bytes to an RGB uint8 (H, W, 3) C-contiguous array.

    The longest side is reduced to at most max_side. Raises ImageDecodeError (only) when the
    bytes are not a usable image; its message starts with one of (callers map these to API codes):
    "empty file", "not an image: looks like text|HTML", "not an image: unrecognised format",
    "truncated or corrupt <FORMAT>: ...", "image too large", "image too small: WxH".
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        rgb = _decode_pillow(data, max_side)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageDecodeError(f"image too large: {exc}") from None
        try:
            rgb = _decode_opencv(data, max_side)
        except Exception as cv_exc:
            detail = f"Pillow cannot identify it; {cv_exc}"
            raise ImageDecodeError(_describe_unreadable(data, detail)) from None
    except MemoryError:
        raise ImageDecodeError(f"image too large to decode in memory ({len(data)} bytes)") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        detail = str(exc) or type(exc).__name__
        raise ImageDecodeError(_describe_unreadable(data, detail)) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageDecodeError(f"decoded to an unexpected array {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageDecodeError(f"image too small: {width}x{height}")
    return np.ascontiguousarray(rgb)


def as_rgb_uint8(image) -> np.ndarray:
    """Check a decoded image handed to a model: uint8, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4);
    greyscale is replicated and alpha dropped. Raises ValueError with what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy RGB image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])
