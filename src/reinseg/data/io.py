"""Reading and writing images and label maps, with errors that name the file.

Images come back as (H, W, 3) uint8 RGB, decoded by OpenCV with the call mmcv's
``LoadImageFromFile`` makes (``cv2.imdecode`` with ``IMREAD_COLOR``), so that grayscale, 16-bit
and oriented images are converted as the official pipeline converts them. Label files come back
as (H, W) integer arrays of their stored values, read with Pillow as mmseg's ``LoadAnnotations``
reads them. Every failure is a :class:`DataError` (a ValueError) whose message starts with the
path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "RASTER_FORMATS",
    "DataError",
    "size_mismatch",
    "read_image",
    "read_photo",
    "read_label",
    "image_size",
    "write_png",
    "write_jpeg",
    "walk_folder",
    "files_below",
]


# The formats an image or label may be in. Pillow identifies a file by its content, not its name,
# and would hand a PostScript/EPS file named x.png to Ghostscript: no file may run code.
RASTER_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")


class DataError(ValueError):
    """A problem with one file of a dataset: ``path`` is the file, ``reason`` what is wrong."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def size_mismatch(image_path, image_hw, label_path, label_hw, native: bool = False) -> DataError:
    """The error for a label whose (H, W) differs from its image's; a ``native`` label (GTAV has
    frames whose label size differs) is told how ``reinseg prepare`` handles it."""
    reason = f"label is {label_hw[0]}x{label_hw[1]} (HxW) but its image {image_path} is {image_hw[0]}x{image_hw[1]}"
    if native:
        reason += "; `reinseg prepare` writes train-ID labels resized to their images (its --on-mismatch)"
    return DataError(label_path, reason)


def _open(path, load: bool = True, rawmode: str | None = None) -> Image.Image:
    """Open an image file; with ``load`` also decode its pixels (which finds truncated files).

    ``rawmode`` overrides how Pillow unpacks the decoded bytes (see :func:`_first_channel`).
    """
    try:
        image = Image.open(path, formats=RASTER_FORMATS)
        if rawmode is not None:
            image.tile = [(tile[0], tile[1], tile[2], rawmode) for tile in image.tile]
        if load:
            image.load()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except Exception as err:  # PIL raises many types for truncated or foreign files
        raise DataError(path, _unreadable(path, err)) from None
    return image


def _unreadable(path, err: Exception) -> str:
    message = str(err).replace(f" '{path}'", "").replace(str(path), "the file")
    return f"unreadable ({type(err).__name__}: {message})"


def read_image(path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grayscale, palette, 16-bit and RGBA images converted)."""
    import cv2  # imported where an image is decoded: the command line's help needs none of it

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as err:
        raise DataError(path, f"unreadable ({err.strerror or err})") from None
    head = data[:32].tobytes()
    _refuse_decompression_bombs(path, head)
    flags = cv2.IMREAD_COLOR
    if _is_webp(head):
        # OpenCV 5 turns WebP images as their EXIF orientation says, 4.x (mmcv's) does not; the
        # label, read by Pillow, is never turned: a square image would silently leave its label.
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise DataError(path, "unreadable (not an image format OpenCV can decode, or a damaged file)")
    if _truncated_jpeg(data):
        # libjpeg decodes a cut-off JPEG with a warning and grey rows; that is a damaged file.
        raise DataError(path, "unreadable (a truncated JPEG: no end-of-image marker after its last scan)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# The first bytes of the formats of RASTER_FORMATS (a damaged file of one of them is left to
# OpenCV, which decodes some that Pillow refuses, such as a PNG with a bad ancillary-chunk checksum).
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"GIF8",
    b"P1",
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",
)


def _is_webp(head: bytes) -> bool:
    """Whether a file's first bytes are a WebP image's (a RIFF container of WEBP)."""
    return head.startswith(b"RIFF") and head[8:12] == b"WEBP"


def _refuse_decompression_bombs(path, head: bytes = b"") -> None:
    """Pillow's limit on pixels (``Image.MAX_IMAGE_PIXELS``) for OpenCV's decoding too, read from
    the file's header (0.02 ms; a copy of the bytes read would take 10x that): OpenCV's own
    limit allows 2**30 pixels, so a 190 KB PNG would take gigabytes."""
    try:
        with Image.open(path, formats=RASTER_FORMATS):
            pass
    except Image.DecompressionBombError as err:
        raise DataError(path, f"refused: {err}") from None
    except UnidentifiedImageError:
        if head.startswith(_SIGNATURES) or _is_webp(head):
            if head.startswith(_SIGNATURES[0]) and head[12:16] == b"IHDR":  # PNG: IHDR comes first
                width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
                if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
                    raise DataError(path, f"refused: {width}x{height} pixels, a decompression bomb") from None
            return  # damaged: OpenCV's decoding says what is wrong
        # OpenCV also decodes JPEG 2000, AVIF, OpenEXR, ... whatever the file's name: their sizes
        # are unchecked (a 277-byte JPEG 2000 named .png claimed 30000x30000).
        formats = ", ".join(RASTER_FORMATS)
        raise DataError(path, f"unreadable (not an image in one of the formats {formats})") from None
    except Exception:  # a damaged header of one of those formats: OpenCV's decoding says what is wrong
        pass


def _truncated_jpeg(data: np.ndarray) -> bool:
    """A JPEG stream that ends before its end-of-image marker (EOI).

    The stream is walked from its start: each segment is skipped by its length (an EXIF thumbnail
    holds a JPEG of its own, EOI included), each scan's entropy-coded data up to the next marker
    (0xFF bytes in it are escaped as FF 00, restart markers are FF D0..D7). Whatever follows the
    stream's EOI is not the image's: phones append a video to "motion photos"."""
    raw = data.tobytes()
    if not raw.startswith(b"\xff\xd8"):
        return False
    position, end = 2, len(raw)
    while True:
        position = raw.find(b"\xff", position)
        if position < 0 or position + 1 >= end:
            return True
        marker = raw[position + 1]
        if marker == 0xD9:
            return False
        if marker == 0xFF:  # fill byte before a marker
            position += 1
        elif marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # escaped data, TEM, restarts
            position += 2
        else:  # a segment: its two length bytes count themselves
            if position + 4 > end:
                return True
            position += 2 + int.from_bytes(raw[position + 2 : position + 4], "big")


def read_photo(path) -> np.ndarray:
    """A photo to segment as (H, W, 3) uint8 RGB, the way a viewer shows it: turned upright as its
    EXIF orientation says (cameras store portrait shots sideways), alpha dropped (grey + alpha PNGs
    included)."""
    image = _open(path)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # a malformed EXIF block
        raise DataError(path, _unreadable(path, err)) from None
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # 16-bit grey: its high byte, as OpenCV (and so evaluation) reads it for an 8-bit image
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode not in ("RGB", "L", "P", "RGBA", "CMYK", "YCbCr", "LA", "PA", "RGBX", "1"):
        raise DataError(path, f"not an 8- or 16-bit colour or grey image (PIL mode {image.mode})")
    return np.array(image.convert("RGB"))


def read_label(path, first_channel: bool = False) -> np.ndarray:
    """The stored values of a label PNG as an (H, W) integer array.

    Single-channel files (8-bit grayscale, palette indices, 16-bit grayscale) give their values.
    With ``first_channel`` the file must be an RGB PNG and its first channel is returned at full
    depth: Synthia stores class IDs in the first channel of 16-bit RGB PNGs, which Pillow would
    otherwise cut to their high byte.
    """
    if first_channel:
        return _first_channel(path)
    image = _open(path)
    if image.mode == "1":  # a bilevel PNG: Pillow gives booleans, mmseg's reading 0 and 1
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("L", "P", "I;16", "I;16B", "I"):
        return np.array(image)
    hint = " (a colour-coded label? use the ID-encoded file)" if image.mode.startswith("RGB") else ""
    raise DataError(path, f"a label map must be a single-channel image, got PIL mode {image.mode}{hint}")


def _first_channel(path) -> np.ndarray:
    """First channel of an RGB PNG at full bit depth (8 or 16 bit)."""
    image = _open(path, load=False)
    rawmode = image.tile[0][3] if image.tile else None
    if image.mode == "RGB" and rawmode == "RGB;16B":
        # Pillow keeps only the high byte of 16-bit samples. Decode twice, reading the
        # big-endian samples once as big- and once as little-endian, to get both bytes.
        high = np.asarray(_open(path, rawmode="RGB;16B"))[..., 0].astype(np.uint16)
        low = np.asarray(_open(path, rawmode="RGB;16L"))[..., 0].astype(np.uint16)
        return (high << 8) | low
    if image.mode in ("RGB", "RGBA"):
        return np.asarray(_open(path))[..., 0]
    raise DataError(path, f"expected an RGB label PNG with the class in the first channel, got PIL mode {image.mode}")


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    width, height = _open(path, load=False).size
    return height, width


def write_png(path, array: np.ndarray, compress_level: int = 6, sync: bool = False) -> None:
    """Save an (H, W) uint8 label map or (H, W, 3) uint8 image as PNG, atomically (``sync``: also
    flushed to disk before it replaces ``path``)."""
    from ..checkpoints import atomic_write  # here, not at the top: that module imports torch

    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=compress_level), sync=sync)


def write_jpeg(path, image: Image.Image) -> None:
    """Save a PIL image as JPEG with Pillow's defaults (as the official Mapillary resize does), atomically."""
    from ..checkpoints import atomic_write

    atomic_write(path, lambda f: image.save(f, format="JPEG"), sync=False)


def walk_folder(base: str | os.PathLike) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, file names)`` of ``base`` and of every folder below it, both in sorted order.

    Folders reached through symbolic links are walked (a dataset's city folders may be links
    to another disk, and the official loaders follow them), except a link to a folder the walk
    is inside (``base`` itself or one above it, or one the walk came through): it would loop,
    or bring in a whole other tree (another split)."""
    # folder -> its real path, and the real paths of the folders the walk came through to it
    ahead: dict[str, tuple[str, frozenset[str]]] = {}
    for directory, dirs, names in os.walk(base, followlinks=True):
        here, above = ahead.pop(directory, None) or (os.path.realpath(directory), frozenset())
        chain = above | {here}
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(directory, name))
            if real not in chain and not (here + os.sep).startswith(real + os.sep):
                kept.append(name)
                ahead[os.path.join(directory, name)] = (real, chain)
        dirs[:] = kept
        yield Path(directory), sorted(names)


def files_below(base: str | os.PathLike) -> list[Path]:
    """Every file below ``base`` (as :func:`walk_folder` walks), as paths relative to it, in the
    walk's order (a folder's files, then its subfolders')."""
    return [(folder / name).relative_to(base) for folder, names in walk_folder(base) for name in names]
