"""Video input: which frames InternVL looks at, decoding them with PyAV, and the per-frame prompt.

The sampling rules follow the original OpenGVLab/InternVL code:

* inference (``get_index`` + ``load_video`` of the README / model cards, and the MVBench evaluator):
  :func:`frame_indices`, reproduced bit for bit (same float arithmetic, same half-to-even rounding);
* training (``get_frame_indices`` in ``internvl_chat/internvl/train/dataset.py``, modes 'rand' and
  'middle'): :func:`training_frame_indices`, the same distribution, drawn from a numpy ``Generator``.

The original decodes with decord, whose frame count is the number of video packets and whose fps is the
stream's average frame rate; :func:`load_video` reads the same two numbers through PyAV.
"""

from __future__ import annotations

import bisect
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["frame_indices", "training_frame_indices", "load_video", "video_prompt"]

# the original's stand-in for "no bound": seconds far outside any real video
_NO_BOUND = (-100000, 100000)


def frame_indices(
    num_frames: int,
    fps: float,
    *,
    num_segments: int = 32,
    bound: Sequence[float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """Indices of the frames InternVL's inference code samples from a video (its ``get_index``).

    With ``last = num_frames - 1`` and ``(t0, t1) = bound`` in seconds (``bound`` None or empty means
    ``(-100000, 100000)``, i.e. the whole video, exactly as the original):

        start = max(first_idx, round(t0 * fps))
        end   = min(round(t1 * fps), last)
        seg   = (end - start) / num_segments
        frame i = int(start + seg / 2 + round(seg * i))      for i in 0 .. num_segments - 1

    ``round`` is round-half-to-even (Python's ``round`` and ``np.round`` agree) and ``int`` truncates
    toward zero; the additions happen in that order, in float64, as in the original. The indices are not
    deduplicated: a video shorter than ``num_segments`` frames repeats frames. A bound that lies outside
    the video (the original would fail in the decoder) raises ``ValueError``.
    """
    num_frames, num_segments = int(num_frames), int(num_segments)
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    if bound is not None and len(bound) > 0:  # the original tests `if bound:`
        if len(bound) != 2:
            raise ValueError(f"bound must be (start_seconds, end_seconds), got {bound!r}")
        t0, t1 = bound
    else:
        t0, t1 = _NO_BOUND
    start = max(first_idx, round(t0 * fps))
    end = min(round(t1 * fps), num_frames - 1)
    seg = float(end - start) / num_segments
    out = [int(start + seg / 2 + round(seg * i)) for i in range(num_segments)]
    if min(out) < 0 or max(out) > num_frames - 1:
        raise ValueError(
            f"bound {bound!r} at {fps} fps selects frames {min(out)}..{max(out)}, outside the video's "
            f"{num_frames} frames"
        )
    return out


def training_frame_indices(
    num_frames: int,
    num_segments: int,
    rng: np.random.Generator,
    sample: str = "rand",
) -> list[int]:
    """Frames the original training loader samples (``get_frame_indices``, modes 'rand' / 'middle').

    The video's ``num_frames`` frames are cut into ``n = min(num_segments, num_frames)`` segments at
    ``int(linspace(0, num_frames, n + 1))``; segment j covers frames ``[a_j, b_j)``.

    * 'rand': one frame drawn uniformly from ``a_j .. b_j - 2`` per segment. As in the original, the last
      frame of each segment is never drawn (it picks from ``range(a, b - 1)``); and when some segment has a
      single frame (so that range is empty), it instead takes ``n`` distinct frames drawn uniformly from
      the whole video, sorted.
    * 'middle': ``(a_j + b_j - 1) // 2``, the middle of each segment (deterministic; ``rng`` unused).

    When the video has fewer frames than ``num_segments``, the list is padded to ``num_segments`` with its
    last index. The randomness comes only from ``rng``, so a seeded Generator reproduces the draw.
    """
    num_frames, num_segments = int(num_frames), int(num_segments)
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if sample not in ("rand", "middle"):
        raise ValueError(f"sample must be 'rand' or 'middle', got {sample!r}")
    n = min(num_segments, num_frames)
    edges = np.linspace(0, num_frames, n + 1).astype(int).tolist()
    ranges = [(edges[j], edges[j + 1] - 1) for j in range(n)]  # inclusive (first, last) per segment
    if sample == "middle":
        out = [(a + b) // 2 for a, b in ranges]
    elif all(b > a for a, b in ranges):
        out = [int(rng.integers(a, b)) for a, b in ranges]  # high exclusive: a .. last - 1
    else:
        out = sorted(int(i) for i in rng.permutation(num_frames)[:n])
    if len(out) < num_segments:
        out = out + [out[-1]] * (num_segments - len(out))
    return out


def video_prompt(num_frames: int) -> str:
    """The per-frame image placeholders of the original chat inference: ``Frame1: <image>\\nFrame2: ...``.

    One line per frame, 1-based, each ending in a newline; the question follows directly.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    return "".join(f"Frame{i + 1}: <image>\n" for i in range(num_frames))


# --------------------------------------------------------------------------------------------- decoding


class _SeekFailed(Exception):
    """The timestamp index did not match what the decoder produced: decode sequentially instead."""


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(path, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise OSError(f"cannot read video file {path}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _video_fps(stream, path: str) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):  # decord reads avg_frame_rate
        if rate is not None and rate > 0:
            return float(rate)
    raise ValueError(f"{path}: the video stream does not state a frame rate")


def _packet_index(container, stream) -> tuple[list[int | None], list[bool]]:
    """Demux (without decoding) the video packets: their pts and keyframe flags, in file order."""
    pts, key = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the end-of-stream flush packet
            continue
        pts.append(packet.pts)
        key.append(bool(packet.is_keyframe))
    return pts, key


def _rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])


def _stream_size(stream) -> tuple[int, int] | None:
    w, h = stream.codec_context.width, stream.codec_context.height
    return (w, h) if w > 0 and h > 0 else None


def _decoded_frames(container, stream):
    for packet in container.demux(stream):
        yield from packet.decode()


def _decode_sequential(path: str, wanted: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode from the start, keeping the frames whose decode-order position is in ``wanted``.

    Stops after the last wanted frame. Returns the kept frames and how many frames were decoded (the
    whole video's count when some wanted frame lies past its end).
    """
    import av

    want = set(wanted)
    last = max(want)
    kept: dict[int, np.ndarray] = {}
    container, stream = _open(path)
    count = 0
    try:
        size = _stream_size(stream)
        for i, frame in enumerate(_decoded_frames(container, stream)):
            count = i + 1
            if i in want:
                kept[i] = _rgb(frame, size)
            if i >= last:
                break
    except av.FFmpegError as exc:
        raise OSError(f"cannot decode video file {path}: {exc}") from exc
    finally:
        container.close()
    return kept, count


def _decode_seeking(
    path: str, wanted: Sequence[int], pts_sorted: list[int], key_sorted: list[bool]
) -> dict[int, np.ndarray]:
    """Decode only around the wanted frames: seek to the keyframe before a wanted frame when it lies
    beyond the decoder's position, then decode forward to it. Frame i is the i-th packet in pts order
    (decord's numbering). Raises ``_SeekFailed`` when the decoder's output does not fit that index."""
    import av

    index_of = {p: i for i, p in enumerate(pts_sorted)}
    keyframes = [i for i, k in enumerate(key_sorted) if k]
    if not keyframes or keyframes[0] != 0:
        raise _SeekFailed
    kept: dict[int, np.ndarray] = {}
    container, stream = _open(path)
    try:
        size = _stream_size(stream)
        frames, pos = None, -1  # pos: index of the last frame the decoder gave us
        for target in sorted(set(wanted)):
            key = keyframes[bisect.bisect_right(keyframes, target) - 1]
            if frames is None or key > pos + 1:
                container.seek(pts_sorted[key], backward=True, any_frame=False, stream=stream)
                frames = _decoded_frames(container, stream)
                pos = key - 1
            for frame in frames:
                i = index_of.get(frame.pts)
                if i is None or i > target:
                    raise _SeekFailed
                pos = i
                if i == target:
                    kept[i] = _rgb(frame, size)
                    break
            else:
                raise _SeekFailed
    except av.FFmpegError as exc:
        raise _SeekFailed from exc
    finally:
        container.close()
    return kept


def load_video(
    path: str | os.PathLike,
    *,
    num_segments: int = 32,
    bound: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Decode the frames InternVL's inference samples from a video file.

    Returns ``(frames, indices)``: ``frames`` uint8 RGB ``[num_segments, H, W, 3]``, row k being frame
    ``indices[k]`` of the video, with ``indices = frame_indices(count, fps, num_segments=...,
    bound=bound)`` (a frame picked twice appears twice). ``fps`` is the stream's average frame rate and
    ``count`` its stated frame count, or the number of its packets when the container does not state one.

    Only the selected frames are converted and kept. When the packets carry timestamps the decoder seeks
    to the keyframe before each selected frame instead of decoding the frames in between; otherwise (or
    if the timestamps prove inconsistent) it decodes from the start and stops after the last selected
    frame. A video with fewer frames than it states (truncated) is sampled from the frames it has, with a
    ``UserWarning`` naming both counts. Raises ``FileNotFoundError`` / ``OSError`` for a missing or unreadable file and ``ValueError``
    for a file without a video stream, naming the path.
    """
    import av

    path = os.fspath(path)
    container, stream = _open(path)
    try:
        fps = _video_fps(stream, path)
        stated = int(stream.frames or 0)
        try:
            pts, key = _packet_index(container, stream)
        except av.FFmpegError as exc:
            raise OSError(f"cannot read video file {path}: {exc}") from exc
    finally:
        container.close()
    count = stated if stated > 0 else len(pts)
    if count < 1:
        raise ValueError(f"{path}: the video stream holds no frames")
    indices = frame_indices(count, fps, num_segments=num_segments, bound=bound)

    kept = None
    if len(pts) == count and None not in pts and len(set(pts)) == count:
        order = sorted(range(count), key=pts.__getitem__)
        try:
            kept = _decode_seeking(path, indices, [pts[i] for i in order], [key[i] for i in order])
        except _SeekFailed:
            kept = None
    if kept is None:
        kept, decoded = _decode_sequential(path, indices)
        if len(kept) < len(set(indices)) and 0 < decoded != count:
            # the stated count was wrong (a truncated or damaged file): the decoder ran out first. Sample from the
            # true count, and say so: the frames are not the ones the full video would give
            warnings.warn(f"{path}: the video states {count} frames but only {decoded} decode (truncated or "
                          f"damaged?); sampling {num_segments} frames from those {decoded}", stacklevel=2)
            count = decoded
            indices = frame_indices(count, fps, num_segments=num_segments, bound=bound)
            kept, decoded = _decode_sequential(path, indices)
        if len(kept) < len(set(indices)):
            raise OSError(f"{path}: decoded only {decoded} frames, fewer than the selected frames need")
    return np.stack([kept[i] for i in indices]), indices
