"""decode_image on images generated here in every format/mode it promises, and on bad bytes."""

from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from facedist.images import ImageDecodeError, content_hash, decode_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(width: int = 80, height: int = 60) -> np.ndarray:
    """A smooth RGB image whose colours survive lossy codecs well enough to compare."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)


def _check_rgb(arr: np.ndarray, height: int, width: int) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (height, width, 3)
    assert arr.flags.c_contiguous


@pytest.mark.parametrize(
    "fmt,tolerance",
    [("JPEG", 12), ("PNG", 0), ("BMP", 0), ("TIFF", 0), ("WEBP", 12)],
)
def test_rgb_formats_round_trip(fmt, tolerance):
    src = _gradient()
    out = decode_image(_encode(Image.fromarray(src), fmt))
    _check_rgb(out, 60, 80)
    assert np.abs(out.astype(int) - src.astype(int)).mean() <= tolerance


def test_gif_first_frame_of_animation():
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = decode_image(data)
    _check_rgb(out, 48, 64)
    assert tuple(out[10, 10]) == (255, 0, 0)


def test_grayscale_is_replicated_to_three_channels():
    gray = _gradient()[..., 0]
    out = decode_image(_encode(Image.fromarray(gray, mode="L"), "PNG"))
    _check_rgb(out, 60, 80)
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 1], gray)


def test_bilevel_image():
    img = Image.new("1", (40, 32), 0)
    img.paste(1, (0, 0, 20, 32))
    out = decode_image(_encode(img, "PNG"))
    _check_rgb(out, 32, 40)
    assert tuple(out[5, 5]) == (255, 255, 255) and tuple(out[5, 30]) == (0, 0, 0)


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (40, 30), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.paste(1, (20, 0, 40, 30))
    data = _encode(img, "PNG", transparency=0)  # palette index 0 (black) is transparent
    out = decode_image(data)
    _check_rgb(out, 30, 40)
    assert tuple(out[5, 5]) == (255, 255, 255)
    assert tuple(out[5, 30]) == (200, 10, 10)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_rgba_composites_on_white(fmt):
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = 255                 # red everywhere ...
    rgba[:, :20, 3] = 0                # ... transparent on the left
    rgba[:, 20:, 3] = 255              # ... opaque on the right
    data = _encode(Image.fromarray(rgba, mode="RGBA"), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = decode_image(data)
    _check_rgb(out, 30, 40)
    assert tuple(out[10, 5]) == (255, 255, 255)
    assert tuple(out[10, 35]) == (255, 0, 0)


def test_grayscale_with_alpha():
    la = Image.new("LA", (32, 32), (0, 0))
    la.paste((50, 255), (16, 0, 32, 32))
    out = decode_image(_encode(la, "PNG"))
    assert tuple(out[4, 4]) == (255, 255, 255) and tuple(out[4, 20]) == (50, 50, 50)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_scaled_to_8bit(fmt):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    data = _encode(Image.fromarray(ramp), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    _check_rgb(out, 48, 64)
    expected = np.round(ramp.astype(np.float64) / 257).astype(int)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16bit_colour_scaled_to_8bit(ext):
    bgr16 = np.zeros((40, 60, 3), np.uint16)
    bgr16[..., 2] = 65535              # red at full scale
    bgr16[..., 1] = 32896              # green at half scale
    ok, buf = cv2.imencode(ext, bgr16)
    assert ok
    out = decode_image(buf.tobytes())
    _check_rgb(out, 40, 60)
    assert tuple(out[0, 0]) == (255, 128, 0)


def test_cmyk_jpeg():
    img = Image.fromarray(_gradient()).convert("CMYK")
    out = decode_image(_encode(img, "JPEG", quality=95))
    _check_rgb(out, 60, 80)
    assert np.abs(out.astype(int) - _gradient().astype(int)).mean() < 20


@pytest.mark.parametrize("orientation,shape", [(1, (60, 80)), (3, (60, 80)), (6, (80, 60)), (8, (80, 60))])
def test_exif_orientation_applied(orientation, shape):
    src = np.zeros((60, 80, 3), np.uint8)
    src[:20, :20] = (255, 0, 0)  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(_encode(Image.fromarray(src), "JPEG", exif=exif, quality=95))
    _check_rgb(out, *shape)
    # Where the stored top-left corner must end up after the rotation the tag asks for.
    corner = {1: (0, 0), 3: (-1, -1), 6: (0, -1), 8: (-1, 0)}[orientation]
    assert out[corner[0], corner[1], 0] > 200 and out[corner[0], corner[1], 2] < 60


def test_no_extension_needed(tmp_path):
    path = tmp_path / "subject01.happy"  # Yale-style name: the content says it is a GIF
    path.write_bytes(_encode(Image.fromarray(_gradient()).convert("L"), "GIF"))
    _check_rgb(decode_image(path.read_bytes()), 60, 80)


def test_huge_jpeg_is_reduced_while_decoding():
    data = _encode(Image.new("RGB", (8000, 8000), (10, 120, 230)), "JPEG")
    out = decode_image(data)
    _check_rgb(out, 2048, 2048)
    assert np.abs(out[1000, 1000].astype(int) - (10, 120, 230)).max() <= 3


def test_large_png_downscaled_keeping_aspect():
    data = _encode(Image.new("RGB", (3000, 1500), (200, 30, 40)), "PNG")
    out = decode_image(data, max_side=1000)
    _check_rgb(out, 500, 1000)
    assert tuple(out[250, 500]) == (200, 30, 40)


def test_small_image_kept_as_is():
    out = decode_image(_encode(Image.fromarray(_gradient(320, 243)), "PNG"), max_side=2048)
    _check_rgb(out, 243, 320)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty file (0 bytes)"),
        (b"name,expression\nsubject01,happy\n", "not an image: looks like text"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image: looks like HTML"),
        ("h\u00e9llo w\u00f6rld, caf\u00e9 \u2603\n".encode() * 10, "not an image: looks like text"),
        (bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8)),
         "not an image: unrecognised format"),
    ],
)
def test_not_an_image(data, message):
    with pytest.raises(ImageDecodeError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated_file_says_which_format(fmt):
    full = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), np.uint8)), fmt)
    name = {"WEBP": "WEBP"}.get(fmt, fmt)
    with pytest.raises(ImageDecodeError, match=f"^truncated or corrupt {name}: "):
        decode_image(full[: len(full) // 3])


def test_corrupt_jpeg_header_only():
    with pytest.raises(ImageDecodeError, match="^truncated or corrupt JPEG: "):
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 200)


def test_too_small():
    with pytest.raises(ImageDecodeError, match=r"^image too small: 12x9$"):
        decode_image(_encode(Image.new("RGB", (12, 9)), "PNG"))


def test_only_image_decode_error_escapes():
    """Fuzz: flipped bytes in good files give a decoded image or ImageDecodeError, nothing else."""
    rng = np.random.default_rng(2)
    src = Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8))
    for fmt in ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"):
        good = bytearray(_encode(src, fmt))
        for _ in range(15):
            bad = bytearray(good)
            for pos in rng.integers(0, len(bad), 8):
                bad[pos] = int(rng.integers(0, 256))
            try:
                out = decode_image(bytes(bad))
            except ImageDecodeError:
                continue
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def test_content_hash_is_sha1():
    data = b"\x89PNG fake bytes"
    assert content_hash(data) == hashlib.sha1(data).hexdigest()
    assert content_hash(data) != content_hash(data + b"\x00")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR announcing width x height, and no pixel data: what a decompression
    bomb looks like before anything is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height", [(12000, 12000), (30000, 20000), (65000, 65000)])
def test_decompression_bomb_refused_before_decoding(width, height):
    with pytest.raises(ImageDecodeError, match="^image too large"):
        decode_image(_png_header_only(width, height))
