"""Image preprocessing benchmark: our jitted resize/tile/normalise and our host tiling vs PIL + numpy vs
transformers' processor.

    python bench/preprocess.py                    # 20 photo-like 4:3 JPEG images, 13 tiles each, 5 rounds
    python bench/preprocess.py --rounds 9 --images 10
    python bench/preprocess.py --profile /tmp/prep_trace   # also a breakdown of one round of ours

Workload: ``--images`` photo-like pictures (gradients, shapes, noise, blur; JPEG quality 85, decoded back to
uint8 RGB) of distinct 4:3 sizes from 640x480 to 2400x1800, so every plan is a 4x3 grid + thumbnail = 13 tiles
of 448 px. JPEG decoding is outside every timing; each pipeline starts from the decoded uint8 [H, W, 3] array
and ends with float32 ImageNet-normalised tiles in host or device memory:

  (a) ours: ``plan_tiles`` + ``image_tiles`` (jitted, bucketed; every bucket warmed up once before timing),
      ``block_until_ready`` on each result. The host-side weight computation (``pil_bicubic_matrix``,
      ``axis_bands``) is included: the weight cache is cleared before every round, since real images rarely
      repeat sizes (``--keep-weight-cache`` keeps it, i.e. a workload of repeated sizes).
  (a') ours host: ``pil_tiles`` + ``normalize`` (``Processor(resize="pil")``, the default, and the training
      pipeline's tiling): the original's PIL calls, normalised in place on pixel rows; bit-equal to (b).
  (b) PIL + numpy: the original dynamic_preprocess: PIL bicubic resize of the whole image to 1792x1344, 12
      crops, a 448x448 bicubic thumbnail, then ``(x / 255 - mean) / std`` in numpy float32.
  (c) transformers: ``GotOcr2ImageProcessorPil`` (the PIL backend of the InternVL / GOT-OCR2 processor;
      the fast torchvision one needs torchvision) with crop_to_patches=True, max_patches=12, 448x448 patches,
      ImageNet mean/std, ``return_tensors="np"``, one call per image.

Rounds are interleaved (a, b, c, a, b, c, ...) and medians reported, because a shared CPU changes speed over
time. Accuracy: max and mean absolute difference of ours vs PIL and ours vs transformers, de-normalised back
to pixel values, in 1/255 units over every tile of the workload (goal: max <= 2, mean <= 0.3 vs PIL).

Device: JAX runs on its default device (``jax.devices()[0]``), so on a GPU machine (a) measures GPU throughput
(host-side weights + transfer of the uint8 image included); (b) and (c) always run on the CPU, single-threaded
(PIL). There is no batched mode: ``image_tiles`` takes one image per call (one compiled program per bucket).

``--profile DIR``: one more round of ours with ``pil_bicubic_matrix``, ``axis_bands`` and ``render_image``
wrapped in timers and ``jax.profiler.TraceAnnotation`` (``render_image`` blocked inside its wrapper so its
time is the device time), traced with ``jax.profiler.trace(DIR)``; prints where the time goes (host weights,
device passes, the rest: padding, tile gather and thumbnail concatenation) and the slowest XLA ops of the
trace.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict

import numpy as np
from PIL import Image

TILE = 448
# distinct 4:3 sizes (w, 3w/4): every one plans to a 4x3 grid + thumbnail
SIZES = [(1600, 1200), (800, 600), (2048, 1536), (1024, 768), (640, 480), (1280, 960), (1440, 1080), (1200, 900),
         (960, 720), (2400, 1800), (1120, 840), (1360, 1020), (1520, 1140), (1680, 1260), (1760, 1320), (1920, 1440),
         (880, 660), (720, 540), (2000, 1500), (1800, 1350)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--images", type=int, default=20, help=f"images in the workload (at most {len(SIZES)} distinct sizes, cycled)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline (interleaved a, b, c)")
    p.add_argument("--keep-weight-cache", action="store_true",
                   help="keep ours' resampling-weight cache between rounds (default: cleared before every round)")
    p.add_argument("--skip-transformers", action="store_true", help="leave out pipeline (c)")
    p.add_argument("--profile", metavar="DIR", default=None, help="trace one extra round of ours into DIR and print a breakdown")
    return p.parse_args()


def main():
    args = parse_args()

    import jax

    from internvl_jax.processing import resample
    from internvl_jax.processing.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize
    from internvl_jax.processing.resample import image_tiles, render_image
    from internvl_jax.processing.tiling import pil_tiles, plan_tiles
    from internvl_jax.samples import photo_like

    sizes = [SIZES[i % len(SIZES)] for i in range(args.images)]
    t0 = time.perf_counter()
    images = [photo_like(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    plans = [plan_tiles(w, h, max_tiles=12, use_thumbnail=True) for w, h in sizes]
    assert all((p.cols, p.rows, p.num_tiles) == (4, 3, 13) for p in plans), [(p.cols, p.rows) for p in plans]
    n_tiles = sum(p.num_tiles for p in plans)
    mpix = sum(w * h for w, h in sizes) / 1e6
    print(f"workload: {len(images)} JPEG photo-like images, 4:3, {min(sizes)[0]}x{min(sizes)[1]} .. "
          f"{max(sizes)[0]}x{max(sizes)[1]} ({mpix:.1f} Mpixel), 4x3 grid + thumbnail = {n_tiles} tiles "
          f"(generated in {time.perf_counter() - t0:.1f} s)")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"PIL {Image.__version__}")

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    # ---- the three pipelines: uint8 HWC image -> float32 normalised tiles ------------------------------------
    def ours(image, plan):
        return image_tiles(image, plan, tile=TILE).block_until_ready()

    def pil_numpy(image, plan):
        im = Image.fromarray(image)
        big = im.resize((TILE * plan.cols, TILE * plan.rows), Image.BICUBIC)
        tiles = [big.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE))
                 for r in range(plan.rows) for c in range(plan.cols)]
        if plan.thumbnail:
            tiles.append(im.resize((TILE, TILE), Image.BICUBIC))
        return (np.stack([np.asarray(t) for t in tiles]).astype(np.float32) / np.float32(255.0) - mean) / std

    def ours_host(image, plan):  # the Processor's default (resize="pil") and the training pipeline's tiling
        return normalize(pil_tiles(Image.fromarray(image), plan, TILE))

    pipelines = {"ours": ours, "ours host": ours_host, "PIL+numpy": pil_numpy}
    if not args.skip_transformers:
        import transformers
        from transformers import GotOcr2ImageProcessorPil

        processor = GotOcr2ImageProcessorPil(
            crop_to_patches=True, min_patches=1, max_patches=12, size={"height": TILE, "width": TILE},
            image_mean=[float(v) for v in mean], image_std=[float(v) for v in std])

        def hf(image, plan):
            return processor(images=[image], return_tensors="np")["pixel_values"]  # [n, 3, 448, 448]

        pipelines["transformers"] = hf
        print(f"transformers {transformers.__version__}: {type(processor).__name__}")

    # ---- warm-up: compile every bucket once; accuracy on the workload -------------------------------------
    cache0 = render_image._cache_size()
    t0 = time.perf_counter()
    outs = {name: [np.asarray(fn(im, p)) for im, p in zip(images, plans)] for name, fn in pipelines.items()}
    compiles = render_image._cache_size() - cache0
    print(f"warm-up: {compiles} compiled render_image programs (whole workload) in {time.perf_counter() - t0:.1f} s")

    def pixels(name, x):  # back to pixel values (0..255), tiles [n, H, W, 3], float64
        x = np.asarray(x, np.float64)
        if name == "transformers":
            x = np.moveaxis(x, 1, -1)
        return (x * std + mean) * 255.0

    ref = [pixels("PIL+numpy", x) for x in outs["PIL+numpy"]]
    ours_px = [pixels("ours", x) for x in outs["ours"]]
    for name in [n for n in pipelines if n != "ours"]:
        other = ref if name == "PIL+numpy" else [pixels(name, x) for x in outs[name]]
        assert all(a.shape == b.shape for a, b in zip(ours_px, other)), name
        d = [np.abs(a - b) for a, b in zip(ours_px, other)]
        dmax = max(x.max() for x in d)
        dmean = sum(x.sum() for x in d) / sum(x.size for x in d)
        off = sum(int((x > 0.5).sum()) for x in d) / sum(x.size for x in d)
        print(f"accuracy ours vs {name:12s}: max {dmax:.3f}/255, mean {dmean:.4f}/255, values off by >= 1: {off:.2e}")
    if "transformers" in outs:
        d = [np.abs(pixels("transformers", a) - b) for a, b in zip(outs["transformers"], ref)]
        print(f"accuracy transformers vs PIL+numpy: max {max(x.max() for x in d):.3f}/255 (same PIL resize)")
    del outs, ref, ours_px

    # ---- interleaved timed rounds ------------------------------------------------------------------------
    times = defaultdict(list)
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            if name == "ours" and not args.keep_weight_cache:
                resample.pil_bicubic_matrix.cache_clear()
            t0 = time.perf_counter()
            for im, p in zip(images, plans):
                fn(im, p)
            times[name].append(time.perf_counter() - t0)
    assert render_image._cache_size() - cache0 == compiles, "timed rounds compiled new programs"

    print(f"\n{args.rounds} interleaved rounds of {len(images)} images, medians "
          f"(weight cache {'kept' if args.keep_weight_cache else 'cleared every round'}):")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = len(images) / med
        print(f"  {name:12s} {rate[name]:7.2f} images/s  {rate[name] * 13:7.1f} tiles/s  "
              f"{1e3 * med / len(images):7.1f} ms/image  (rounds: {', '.join(f'{t:.2f}' for t in ts)} s)")
    for name in [n for n in pipelines if n != "ours"]:
        print(f"  ours / {name}: {rate['ours'] / rate[name]:.2f}x")
    print(f"  ours host / PIL+numpy: {rate['ours host'] / rate['PIL+numpy']:.2f}x")
    print(f"  compiled render_image programs: {compiles} (none added by the timed rounds)")

    if args.profile:
        profile(args.profile, images, plans, ours, resample, keep_cache=args.keep_weight_cache)


def profile(trace_dir, images, plans, ours, resample, *, keep_cache):
    """One round of ours with the host weight functions and the device program wrapped in timers + annotations."""
    import jax

    spent = defaultdict(float)
    originals = {k: getattr(resample, k) for k in ("pil_bicubic_matrix", "axis_bands", "render_image")}

    def wrap(name, fn, block=False):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            with jax.profiler.TraceAnnotation(f"bench:{name}"):
                out = fn(*a, **kw)
                if block:
                    out = out.block_until_ready()
            spent[name] += time.perf_counter() - t0
            return out
        return timed

    if not keep_cache:
        resample.pil_bicubic_matrix.cache_clear()
    for k, fn in originals.items():
        setattr(resample, k, wrap(k, fn, block=k == "render_image"))
    try:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # Python function events would slow the host loops down several-fold
        options.host_tracer_level = 3
        with jax.profiler.trace(trace_dir, profiler_options=options):
            t0 = time.perf_counter()
            for im, p in zip(images, plans):
                with jax.profiler.TraceAnnotation("bench:image"):
                    ours(im, p)
            total = time.perf_counter() - t0
    finally:
        for k, fn in originals.items():
            setattr(resample, k, fn)

    n = len(images)
    rest = total - sum(spent.values())
    print(f"\nprofile of one round of ours ({n} images, {1e3 * total / n:.1f} ms/image; render_image blocked):")
    for name, t in [("host pil_bicubic_matrix", spent["pil_bicubic_matrix"]), ("host axis_bands", spent["axis_bands"]),
                    ("device render_image", spent["render_image"]), ("rest (pad, gather, concat, dispatch)", rest)]:
        print(f"  {name:38s} {1e3 * t / n:7.1f} ms/image  {100 * t / total:5.1f} %")

    try:
        import glob

        path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
        ops, calls = defaultdict(float), defaultdict(int)
        wrappers = ("bench:", "ThunkExecutor", "PjitFunction", "CommonPjRt", "DevicePut", "H2D", "$")
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if not ev.name.startswith(wrappers):
                        kind = re.sub(r"\.\d+$", "", ev.name)  # fusion.12 -> fusion: one row per op kind
                        where = "eager" if line.name == "python" else "XLA"
                        ops[(where, kind)] += ev.duration_ns
                        calls[(where, kind)] += 1
        print(f"  XLA ops by kind, summed over threads (XLA: inside jitted programs, eager: ops outside jit;"
              f" ynn_fusion = the matmuls), {path}:")
        for (where, kind), ns in sorted(ops.items(), key=lambda kv: -kv[1])[:12]:
            print(f"    {ns / 1e6 / n:8.2f} ms/image  {calls[(where, kind)] / n:6.1f} calls/image  {where:5s} {kind[:60]}")
    except Exception as e:  # noqa: BLE001 - the breakdown above stands without the trace
        print(f"  (could not read the trace: {e!r})")


if __name__ == "__main__":
    main()
