"""Segmenting a video with a checkpoint: an overlay video and, optionally, per-frame PNGs.

Frames stream from the decoder through the model in batches and on to the encoder: at most one
batch of frames is held at a time, whatever the video's length. Reading and writing use PyAV
(FFmpeg's libraries, shipped in its wheels: ``pip install reinseg[video]``). The output folder
is built beside its target under a temporary name and renamed when complete, so a corrupt video
or an interrupted run leaves no half-written folder.
"""

from __future__ import annotations

import numbers
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import numpy as np

__all__ = [
    "VIDEO_SUFFIXES",
    "is_video",
    "VideoInfo",
    "display_matrix",
    "upright",
    "probe_video",
    "read_frames",
    "VideoWriter",
    "predict_video",
]

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DEFAULT_FPS = Fraction(25)  # for containers that record no frame rate


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _av():
    try:
        import av
    except ImportError as err:
        raise RuntimeError(f"videos need PyAV: `pip install reinseg[video]` ({err})") from None
    return av


@dataclass
class VideoInfo:
    width: int  # upright, as players show the video (see display)
    height: int
    fps: Fraction
    frames: int | None  # as the container records it (None: unknown)
    # The stored frames' display matrix (a, b, c, d), each -1, 0 or 1 (:func:`display_matrix`): a
    # phone's portrait video is stored landscape with a matrix saying how to show it. None: as stored.
    display: tuple[int, int, int, int] | None = None


def display_matrix(frame) -> tuple[int, int, int, int] | None:
    """The display matrix a decoded frame carries, ``(a, b, c, d)`` with each entry -1, 0 or 1, when
    it is a quarter turn, a half turn or a mirror (what phones and editors write); None without one
    or for any other (a degenerate or an oblique matrix is left alone, as players do)."""
    # Looked up by name: iterating the side data yields the entries up to PyAV 18.1.0 and their
    # types from 18.1.1 on; get() by name answers alike from 14.1 on.
    data = frame.side_data.get("DISPLAYMATRIX")
    if data is None:
        return None
    a, b, _, c, d, *_ = struct.unpack("=9i", bytes(data))  # 16.16 fixed point, native order
    sa, sb, sc, sd = (0 if abs(v) < 1 << 15 else (1 if v > 0 else -1) for v in (a, b, c, d))
    straight = sb == sc == 0 and sa * sd != 0  # a half turn or a mirror
    turned = sa == sd == 0 and sb * sc != 0  # a quarter turn, perhaps mirrored
    return (sa, sb, sc, sd) if (straight or turned) and (sa, sb, sc, sd) != (1, 0, 0, 1) else None


def upright(image: np.ndarray, display: tuple[int, int, int, int] | None) -> np.ndarray:
    """``image (H, W, 3)`` as its display matrix says to show it. The matrix maps a stored pixel
    ``(x, y)`` to ``(a x + c y, b x + d y)`` (FFmpeg's ``libavutil/display.h``)."""
    if display is None:
        return image
    a, b, c, d = display
    if a == 0:  # x' = c y, y' = b x: the axes exchange
        image, flip_rows, flip_columns = image.transpose(1, 0, 2), b < 0, c < 0
    else:  # x' = a x, y' = d y
        flip_rows, flip_columns = d < 0, a < 0
    return np.ascontiguousarray(image[:: -1 if flip_rows else 1, :: -1 if flip_columns else 1])


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate and frame count of a video's first video stream; decodes the first frame,
    so that a file FFmpeg cannot read fails here, with its name, before anything is written."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise ValueError(f"{path}: its video stream holds no frame")
            rate = stream.average_rate or stream.guessed_rate
            display = display_matrix(first)
            turned = display is not None and display[0] == 0
            width, height = (first.height, first.width) if turned else (first.width, first.height)
            return VideoInfo(width, height, Fraction(rate) if rate else DEFAULT_FPS, stream.frames or None, display)
    except (av.error.FFmpegError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a video FFmpeg can read ({err})") from None


def read_frames(path: str | Path) -> Iterator[np.ndarray]:
    """The RGB frames ``(H, W, 3)`` uint8 of a video, one at a time (a generator), upright as
    the stream's display matrix says (as players show them)."""
    for image, _ in read_timed_frames(path):
        yield image


def read_timed_frames(path: str | Path) -> Iterator[tuple[np.ndarray, Fraction | None]]:
    """:func:`read_frames` with each frame's presentation time in seconds (None where the stream
    gives none): a variable-frame-rate video (phones, screen recorders) keeps its timing."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                time = presentation_time(frame.pts, frame.time_base)
                yield upright(frame.to_ndarray(format="rgb24"), display_matrix(frame)), time
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: decoding failed ({err})") from None


def presentation_time(pts: int | None, time_base: numbers.Rational | None) -> Fraction | None:
    """``pts`` ticks of ``time_base`` seconds, or None where either is unset: PyAV 18 and older
    give an unset time base as None, PyAV 19 as a zero ``av.AVRational`` (a ``numbers.Rational``)."""
    if pts is None or not time_base:
        return None
    return pts * Fraction(time_base)


class VideoWriter:
    """H.264 (yuv420p) video of RGB frames ``(H, W, 3)`` uint8; odd sizes are padded to even ones
    with their last row / column (4:2:0 chroma needs even sizes). Frames given their time keep
    it (in steps of 1/90000 s, MPEG's clock), the others follow at ``fps``."""

    TIME_BASE = Fraction(1, 90000)

    def __init__(self, path: str | Path, width: int, height: int, fps: Fraction) -> None:
        av = _av()
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("h264", rate=fps)
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = self.TIME_BASE
        self.fps = Fraction(fps)
        self.frames = 0
        self.start: Fraction | None = None
        self.last_pts = -1

    def write(self, frame: np.ndarray, time: Fraction | None = None) -> None:
        """Append ``frame``, shown at ``time`` seconds (relative to the first frame's) if given."""
        av = _av()
        pad = ((0, self.stream.height - frame.shape[0]), (0, self.stream.width - frame.shape[1]), (0, 0))
        if any(p[1] for p in pad):
            frame = np.pad(frame, pad, mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if time is not None and self.start is None:
            self.start = time
        seconds = time - self.start if time is not None and self.start is not None else self.frames / self.fps
        # Strictly increasing: a stream whose times repeat or go back gets the next tick.
        pts = max(round(seconds / self.TIME_BASE), self.last_pts + 1)
        video_frame.pts, video_frame.time_base = pts, self.TIME_BASE
        self.last_pts = pts
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode(None):  # flush the encoder's delayed frames
            self.container.mux(packet)
        self.container.close()


T = TypeVar("T")


def _batches(frames: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_video(
    checkpoint: str,
    video: str | Path,
    output: str | Path,
    scale="checkpoint",
    mode: str | None = None,
    flip: bool | None = None,
    device: str | None = None,
    batch: int = 8,
    frames: bool = False,
    progress: bool = True,
    backbone: str | None = None,
    window_batch: int | None = None,
) -> list[Path]:
    """Segment every frame of ``video``; writes ``<stem>_overlay.mp4`` (the classes' colours over
    the frames, at the video's size, frame rate and frame times) into ``output`` and, with ``frames``,
    ``<stem>_frames/<stem>_<n>_labelTrainIds.png`` and ``..._overlay.png`` per frame (n from 1).

    ``scale``, ``mode``, ``flip``, ``device``, ``backbone``, ``window_batch``: as
    :func:`reinseg.predict.predict_files`.
    ``batch``: frames run through the model at once. Returns the files written.
    """
    from tqdm import tqdm

    from .checkpoints import staging_folder
    from .data.io import write_png
    from .predict import load_for_prediction, overlay, segment_images

    video = Path(video)
    if batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {batch}")
    if not video.is_file():
        raise FileNotFoundError(2, "No such file", str(video))
    info = probe_video(video)  # a video FFmpeg cannot read is refused before anything is written
    segmentor, classes, scale, size = load_for_prediction(checkpoint, scale, device, backbone, window_batch)
    total = "?" if info.frames is None else info.frames
    shown = ", turned as its display matrix says" if info.display is not None else ""
    rate = f"{total} frames at {float(info.fps):g} fps"
    print(f"segmenting {video} ({info.width}x{info.height}{shown}, {rate}) at {size}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(out)  # and a killed run's, with its frames, removed
    try:
        writer = VideoWriter(staging / f"{video.stem}_overlay.mp4", info.width, info.height, info.fps)
        frame_dir = staging / f"{video.stem}_frames"
        count = 0
        with tqdm(total=info.frames, desc="predict", unit="frame", disable=not progress) as bar:
            try:
                for chunk in _batches(read_timed_frames(video), batch):
                    images = [image for image, _ in chunk]
                    predicted = segment_images(segmentor, images, scale, mode, flip)
                    for (image, time), train_ids in zip(chunk, predicted, strict=True):
                        count += 1
                        colored = overlay(image, train_ids, classes)
                        writer.write(colored, time)
                        if frames:
                            stem = f"{video.stem}_{count:06d}"
                            write_png(frame_dir / f"{stem}_labelTrainIds.png", train_ids)
                            write_png(frame_dir / f"{stem}_overlay.png", colored)
                    bar.update(len(chunk))
            finally:
                writer.close()
        # The overlay video first (what the command reports), then the frames in order.
        written = (p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
        names = sorted(written, key=lambda p: (len(p.parts), p))
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stale = out / frame_dir.name
    if not frames and stale.is_dir():  # kept (a user's files), but they are not this run's
        print(f"note: {stale} holds an earlier run's frames; this run wrote none (--frames replaces them)")
    return [out / name for name in names]


def _publish(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out``: renamed if ``out`` does not exist, else its
    entries are moved in (replacing those of an earlier run)."""
    if not out.exists():
        os.replace(staging, out)
        return
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir() and entry.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
