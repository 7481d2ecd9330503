"""`reinseg predict` on videos: a synthetic clip made here with PyAV round-trips; frames stream."""

import struct
from fractions import Fraction

import numpy as np
import pytest
from conftest import killed_writers_leftover, tiny_model_config

from reinseg.build import build_segmentor
from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
from reinseg.cli import main
from reinseg.config import Config, to_dict

av = pytest.importorskip("av", reason="videos need the [video] extra (PyAV)")

FPS, SECONDS, HEIGHT, WIDTH = 10, 3, 48, 64


def make_video(path, frames=FPS * SECONDS, height=HEIGHT, width=WIDTH, fps=FPS):
    """A clip of moving coloured bars, written with PyAV itself (H.264, yuv420p)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for n in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[:, (n * 2) % width :] = (200, 40, 40)
            image[: height // 2, :, 1] = 180
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def with_display_matrix(path, a, b, c, d):
    """Write the display matrix ``[[a, b], [c, d]]`` (16.16 fixed point) into the video's track
    header, as a phone stores a portrait video: the frames stay landscape, players turn them."""
    data = bytearray(path.read_bytes())
    tkhd = data.index(b"tkhd")
    assert data[tkhd + 4] == 0  # version 0: 32-bit times
    # version, flags, created, modified, track, reserved, duration, reserved (8), layer ... volume (8)
    matrix = tkhd + 4 + 4 + 5 * 4 + 8 + 8
    data[matrix : matrix + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


def decoded(path):
    """(frame count, (H, W)) of a video as FFmpeg reads it back."""
    with av.open(str(path)) as container:
        sizes = [(f.height, f.width) for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(set(sizes)) == 1
    return len(sizes), sizes[0], rate


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model_config()
    return save_checkpoint(
        tmp_path / "model.ckpt", to_dict(Config(model=model)), checkpoint_state_dict(build_segmentor(model))
    )


def test_a_three_second_video_round_trips(checkpoint, tmp_path, capsys):
    from PIL import Image

    from reinseg.checkpoints import segmentor_from_checkpoint
    from reinseg.predict import segment_image

    clip = make_video(tmp_path / "clip.mp4")
    assert decoded(clip)[0] == FPS * SECONDS
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(clip), "--output", str(out), "--scale", "64", "48", "--batch", "4"]
    killed_writers_leftover(tmp_path, "out", is_folder=True)  # removed below (no "partial" left)
    assert main([*argv, "--frames"]) == 0
    captured = capsys.readouterr()
    assert f"{FPS * SECONDS}/{FPS * SECONDS}" in captured.err  # the progress bar, on stderr
    assert f"wrote {out / 'clip_overlay.mp4'} and {2 * FPS * SECONDS} frame PNGs" in captured.out
    count, size, rate = decoded(out / "clip_overlay.mp4")
    assert (count, size, rate) == (FPS * SECONDS, (HEIGHT, WIDTH), FPS)
    labels = sorted((out / "clip_frames").glob("*_labelTrainIds.png"))
    assert len(labels) == len(list((out / "clip_frames").glob("*_overlay.png"))) == FPS * SECONDS
    # A frame's train IDs are those of the same decoded frame segmented on its own as an image.
    with av.open(str(clip)) as container:
        frame = next(f for n, f in enumerate(container.decode(video=0)) if n == 6).to_ndarray(format="rgb24")
    segmentor, _ = segmentor_from_checkpoint(checkpoint)
    expected = segment_image(segmentor.eval(), frame, (64, 48))
    np.testing.assert_array_equal(np.asarray(Image.open(labels[6])), expected)
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    # A re-run without --frames keeps the earlier frames and says they are not this run's.
    assert main(argv) == 0
    assert f"{out / 'clip_frames'} holds an earlier run's frames" in capsys.readouterr().out
    assert len(list((out / "clip_frames").glob("*_labelTrainIds.png"))) == FPS * SECONDS


def test_frames_stream_through_in_batches(checkpoint, tmp_path, monkeypatch):
    """At most one batch of decoded frames is alive before the encoder takes them: memory does not
    grow with the video's length."""
    import reinseg.video as video

    alive, peak = [0], [0]
    real_read, real_write = video.read_timed_frames, video.VideoWriter.write

    def counting_read(path):
        for frame in real_read(path):
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            yield frame

    def counting_write(self, frame, time=None):
        alive[0] -= 1
        real_write(self, frame, time)

    monkeypatch.setattr(video, "read_timed_frames", counting_read)
    monkeypatch.setattr(video.VideoWriter, "write", counting_write)
    clip = make_video(tmp_path / "clip.mp4", frames=23, height=32, width=32)
    written = video.predict_video(str(checkpoint), clip, tmp_path / "out", scale=(32, 32), batch=5, progress=False)
    assert decoded(written[0])[:2] == (23, (32, 32))
    assert alive[0] == 0 and peak[0] == 5


def test_a_variable_frame_rate_video_keeps_its_timing(checkpoint, tmp_path):
    """Phones and screen recorders pause the clock (here 2 s between frames 4 and 5): each
    overlay frame is shown when its frame was."""
    from reinseg.video import predict_video

    times = [0, 0.1, 0.2, 0.3, 2.3, 2.4, 2.5, 2.6]
    clip = tmp_path / "vfr.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    written = predict_video(str(checkpoint), clip, tmp_path / "out", scale=(64, 48), progress=False)
    with av.open(str(written[0])) as container:
        shown = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    assert shown == pytest.approx(times, abs=1e-3)


@pytest.mark.parametrize(
    "pts, time_base, seconds",
    [
        (None, Fraction(1, 1000), None),
        (2300, None, None),  # PyAV 18 and older: an unset time base is None
        (2300, Fraction(1, 1000), Fraction(23, 10)),
        (0, Fraction(1, 90000), Fraction(0)),
    ],
)
def test_a_frame_without_a_time_base_has_no_time(pts, time_base, seconds):
    from reinseg.video import presentation_time

    assert presentation_time(pts, time_base) == seconds
    assert seconds is None or isinstance(presentation_time(pts, time_base), Fraction)


@pytest.mark.skipif(not hasattr(av, "AVRational"), reason="no av.AVRational in this PyAV (18.1.1 has it)")
def test_pyavs_own_rational_time_bases():
    from reinseg.video import presentation_time

    # PyAV 19 gives an unset time base as this zero rational (falsy), never as None.
    assert presentation_time(2300, av.AVRational(0, 1)) is None
    assert presentation_time(2300, av.AVRational(1, 1000)) == Fraction(23, 10)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100, "truncated"])
def test_a_corrupt_video_is_named_and_nothing_is_written(checkpoint, tmp_path, capsys, content):
    bad = tmp_path / "bad.mp4"
    if content == "truncated":
        whole = make_video(tmp_path / "whole.mp4").read_bytes()
        content = whole[: len(whole) // 2]  # mdat cut: no index (moov) at the end
    bad.write_bytes(content)
    assert main(["predict", str(checkpoint), str(bad), "--output", str(tmp_path / "out")]) == 2
    assert "bad.mp4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_a_file_without_a_video_stream_is_refused(checkpoint, tmp_path, capsys):
    audio = tmp_path / "sound.mp4"
    with av.open(str(audio), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    assert main(["predict", str(checkpoint), str(audio), "--output", str(tmp_path / "out")]) == 2
    assert "sound.mp4: holds no video stream" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_video_leaves_no_half_written_folder(checkpoint, tmp_path, monkeypatch):
    import reinseg.video as video

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("reinseg.predict.segment_images", failing)
    clip = make_video(tmp_path / "clip.mp4", frames=4, height=32, width=32)
    with pytest.raises(RuntimeError, match="out of memory"):
        video.predict_video(str(checkpoint), clip, tmp_path / "out", scale=(32, 32), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "model.ckpt"]


def test_videos_by_glob_and_two_videos_of_one_name(checkpoint, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = make_video(tmp_path / "a" / "drive.mp4"), make_video(tmp_path / "b" / "drive.mp4")
    argv = ["predict", str(checkpoint), "--output", str(tmp_path / "out"), "--scale", "64", "48"]
    assert main([*argv, str(first), str(second)]) == 2
    err = capsys.readouterr().err
    assert str(first) in err and str(second) in err and "drive_overlay.mp4" in err
    assert not (tmp_path / "out").exists()
    assert main([*argv, str(tmp_path / "a" / "*.mp4")]) == 0  # a pattern names videos, not a file
    assert (tmp_path / "out" / "drive_overlay.mp4").is_file()


def test_a_bad_video_among_images_is_refused_before_any_image_is_written(checkpoint, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "image.png")
    (tmp_path / "bad.mov").write_bytes(b"\x00" * 4096)
    argv = ["predict", str(checkpoint), str(tmp_path / "image.png"), str(tmp_path / "bad.mov")]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "bad.mov" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


Q = 1 << 16  # 1.0 in the display matrix's 16.16 fixed point


@pytest.mark.parametrize(
    "matrix, shown",
    [
        # (a, b, c, d) -> the stored frame as players show it (numpy); FFmpeg's names in comments.
        ((0, Q, -Q, 0), lambda f: np.rot90(f, -1)),  # "rotation of -90 degrees": an iPhone held upright
        ((0, -Q, Q, 0), lambda f: np.rot90(f, 1)),  # +90
        # The others in the full suite.
        pytest.param((-Q, 0, 0, -Q), lambda f: f[::-1, ::-1], marks=pytest.mark.slow),  # 180
        pytest.param((-Q, 0, 0, Q), lambda f: f[:, ::-1], marks=pytest.mark.slow),  # mirrored left to right
        pytest.param((Q, 0, 0, -Q), lambda f: f[::-1], marks=pytest.mark.slow),  # mirrored top to bottom
        pytest.param((0, 0, 0, 0), lambda f: f, marks=pytest.mark.slow),  # degenerate: ignored, as players do
    ],
)
def test_a_video_is_segmented_as_its_display_matrix_shows_it(checkpoint, tmp_path, capsys, matrix, shown):
    from PIL import Image

    from reinseg.checkpoints import segmentor_from_checkpoint
    from reinseg.predict import segment_image
    from reinseg.video import read_frames

    stored = make_video(tmp_path / "stored.mp4", frames=4)
    with av.open(str(stored)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")  # (HEIGHT, WIDTH, 3)
    clip = with_display_matrix(stored, *matrix)
    expected = np.ascontiguousarray(shown(first))
    np.testing.assert_array_equal(next(read_frames(clip)), expected)
    out = tmp_path / "out"
    argv = ["predict", str(checkpoint), str(clip), "--output", str(out), "--scale", "64", "48", "--frames"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (", turned as its display matrix says" in printed) == (matrix != (0, 0, 0, 0))
    assert decoded(out / "stored_overlay.mp4")[1] == expected.shape[:2]
    segmentor, _ = segmentor_from_checkpoint(checkpoint)
    label = np.asarray(Image.open(sorted((out / "stored_frames").glob("*_labelTrainIds.png"))[0]))
    np.testing.assert_array_equal(label, segment_image(segmentor.eval(), expected, (64, 48)))
