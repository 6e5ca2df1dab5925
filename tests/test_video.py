"""Video sampling and decoding: the original InternVL frame rules, and PyAV decoding of the chosen frames."""

import itertools
import wave

import av
import numpy as np
import pytest

from internvl_jax.processing import video
from internvl_jax.processing.video import (
    frame_indices,
    load_video,
    training_frame_indices,
    video_prompt,
)

W, H, N_FRAMES, FPS = 64, 48, 50, 25


def _level(k):
    """Grey level that frame k of the test videos is filled with."""
    return 16 + 4 * k


def _write_video(path, codec, options=None, gop=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        for k in range(N_FRAMES):
            # grey (R = G = B) so the frame lives in luma only and survives yuv420p
            rgb = np.full((H, W, 3), _level(k), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    return {
        # mp4 states its frame count; B-frames (decode order != presentation order; lossless x264 would
        # turn them off, hence crf 1), a keyframe every 8 frames so that load_video seeks
        "h264_mp4": _write_video(d / "h264.mp4", "libx264", {"crf": "1", "bf": "2"}, gop=8),
        # Matroska states no frame count: load_video counts packets
        "mpeg4_mkv": _write_video(d / "mpeg4.mkv", "mpeg4", {"qmin": "1", "qmax": "2"}, gop=12),
    }


def _identify(frames):
    """Frame numbers encoded in decoded frames (tolerating a little codec loss)."""
    means = frames.reshape(len(frames), -1).astype(np.float64).mean(axis=1)
    ks = np.round((means - 16) / 4).astype(int)
    assert np.all(np.abs(means - _level(ks)) < 1.5), means
    return ks.tolist()


def _reference_indices(num_frames, fps, n, bound):
    """The inference rule, written independently (vectorised)."""
    lo, hi = (bound[0], bound[1]) if bound else (-1e5, 1e5)
    first = max(0, int(np.round(lo * fps)))
    last = min(int(np.round(hi * fps)), num_frames - 1)
    step = (last - first) / float(n)
    pos = (first + step * 0.5) + np.round(step * np.arange(n, dtype=np.float64))
    return np.trunc(pos).astype(np.int64).tolist()


# ------------------------------------------------------------------------------------ inference rule


def test_frame_indices_hand_computed():
    # seg = 49/8 = 6.125; round(6.125*4) = round(24.5) = 24 (half to even)
    assert frame_indices(50, 25, num_segments=8) == [3, 9, 15, 21, 27, 34, 40, 46]
    # bound (0.3s, 1.5s) at 25 fps: start round(7.5) = 8, end round(37.5) = 38, seg = 7.5,
    # round(22.5) = 22
    assert frame_indices(50, 25, num_segments=4, bound=(0.3, 1.5)) == [11, 19, 26, 33]
    # fewer frames than segments: frames repeat (seg = 0.5; round(0.5) = 0, round(1.5) = 2)
    assert frame_indices(3, 30, num_segments=4) == [0, 0, 1, 2]
    assert frame_indices(1, 30, num_segments=3) == [0, 0, 0]
    # first_idx 20: seg = 79/4 = 19.75, round(39.5) = 40
    assert frame_indices(100, 10, num_segments=4, first_idx=20) == [29, 49, 69, 88]


@pytest.mark.parametrize("num_frames", [1, 2, 7, 50, 51, 100, 1000, 4321])
def test_frame_indices_matches_reference(num_frames):
    fpss = [1, 0.5, 24, 25, 30000 / 1001, 59.94, 12.5]
    segments = [1, 2, 3, 8, 16, 32, 64]
    bounds = [None, (), (0, 1), (0.5, 1.7), (1.02, 3.3), (-5, 2), (0, 1e6), (2.5, 2.5), (0.3, 1.5)]
    checked = 0
    for fps, n, bound in itertools.product(fpss, segments, bounds):
        want = _reference_indices(num_frames, fps, n, bound)
        if min(want) < 0 or max(want) >= num_frames:  # bound outside the video
            with pytest.raises(ValueError):
                frame_indices(num_frames, fps, num_segments=n, bound=bound)
            continue
        got = frame_indices(num_frames, fps, num_segments=n, bound=bound)
        assert got == want, (num_frames, fps, n, bound)
        assert all(type(i) is int for i in got)
        checked += 1
    assert checked > 100


def test_frame_indices_rejects_bad_arguments():
    bad = [
        {"num_frames": 0, "fps": 25},
        {"num_frames": 5, "fps": 0},
        {"num_frames": 5, "fps": float("nan")},
        {"num_frames": 5, "fps": 25, "num_segments": 0},
        {"num_frames": 5, "fps": 25, "bound": (1,)},
        {"num_frames": 50, "fps": 25, "bound": (10, 20)},  # starts after the video's 2 s
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            frame_indices(**kwargs)


# ------------------------------------------------------------------------------------- training rule


def test_training_rand_segments_and_reproducible():
    num_frames, n = 100, 8
    edges = np.linspace(0, num_frames, n + 1).astype(int)
    a = training_frame_indices(num_frames, n, np.random.default_rng(3))
    assert a == training_frame_indices(num_frames, n, np.random.default_rng(3))
    seen = [set() for _ in range(n)]
    rng = np.random.default_rng(0)
    for _ in range(400):
        idx = training_frame_indices(num_frames, n, rng)
        assert len(idx) == n
        for j, i in enumerate(idx):
            seen[j].add(i)
    for j in range(n):
        # every frame of the segment but its last (the original draws from range(a, b - 1))
        assert seen[j] == set(range(edges[j], edges[j + 1] - 1))


def test_training_middle():
    assert training_frame_indices(100, 8, None, sample="middle") == [5, 18, 30, 43, 55, 68, 80, 93]
    # 5 frames, 8 segments: one frame per segment, padded with the last
    assert training_frame_indices(5, 8, None, sample="middle") == [0, 1, 2, 3, 4, 4, 4, 4]


def test_training_rand_fallback_and_padding():
    # 10 frames in 8 segments: some segment holds one frame -> 8 distinct sorted frames from the video
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = training_frame_indices(10, 8, rng)
        assert len(idx) == 8 and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 10
    # fewer frames than segments: all frames, padded with the last
    assert training_frame_indices(5, 8, rng) == [0, 1, 2, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError):
        training_frame_indices(10, 4, rng, sample="fps1")


def test_video_prompt():
    assert video_prompt(3) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\n"
    assert video_prompt(0) == ""


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("name", ["h264_mp4", "mpeg4_mkv"])
@pytest.mark.parametrize("n,bound", [(8, None), (5, (0.3, 1.5)), (64, None), (1, None)])
def test_load_video_returns_selected_frames(videos, name, n, bound):
    frames, indices = load_video(videos[name], num_segments=n, bound=bound)
    assert indices == frame_indices(N_FRAMES, FPS, num_segments=n, bound=bound)
    assert frames.dtype == np.uint8 and frames.shape == (n, H, W, 3)
    assert _identify(frames) == indices


@pytest.mark.parametrize("name", ["h264_mp4", "mpeg4_mkv"])
def test_seeking_matches_sequential_decoding(videos, name, monkeypatch):
    sequential = video._decode_sequential

    def refuse(*args):
        raise AssertionError("load_video should have seeked")

    monkeypatch.setattr(video, "_decode_sequential", refuse)
    frames, indices = load_video(videos[name], num_segments=6)
    kept, _ = sequential(videos[name], indices)
    np.testing.assert_array_equal(frames, np.stack([kept[i] for i in indices]))


def test_overstated_frame_count_is_corrected(videos, monkeypatch):
    # packets without timestamps and ten too many of them: no seeking, and the decoder runs out of frames
    monkeypatch.setattr(video, "_packet_index", lambda container, stream: ([None] * 60, [True] * 60))
    with pytest.warns(UserWarning, match="states 60 frames but only 50 decode"):
        frames, indices = load_video(videos["mpeg4_mkv"], num_segments=8)
    assert indices == frame_indices(N_FRAMES, FPS, num_segments=8)
    assert _identify(frames) == indices


def test_load_video_errors(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(missing)

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(OSError, match="junk.mp4"):
        load_video(junk)

    audio = tmp_path / "tone.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(800, np.int16).tobytes())
    with pytest.raises(ValueError, match="tone.wav.*no video stream"):
        load_video(audio)
