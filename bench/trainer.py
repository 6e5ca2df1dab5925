"""Trainer benchmark: the whole trainer against the bare train step and PyTorch eager, on the same batches, in one run.

    python bench/trainer.py                                 # small 448 px model, 2 rows x 2048 tokens, 8 steps x 2 rounds
    python bench/trainer.py --torch-mask packed --rounds 1  # PyTorch with the samples' block-diagonal mask, as ours
    python bench/trainer.py --steps 12 --rows 4 --workers 1 # more rows, one grain decoding process
    python bench/trainer.py --skip-torch --workdir /tmp/bt  # trainer and bare step; a rerun there reuses the XLA cache
    python bench/trainer.py --preset InternVL2_5-1B --dtype bfloat16 --rows 8 --max-tiles 7 --steps 10  # the GPU run

On the shared 2-core CPU the default run takes about 3 minutes (the data is written once per ``--workdir``).

The setting: a model with the real tile geometry (448 px tiles of 14 px patches: 1025 ViT tokens and 256 LLM tokens
per tile) but small widths and depths (:func:`small_config`: a 2-layer ViT of width 64 and a 2-layer Qwen2 of width
256; ``--preset NAME`` takes a release's shapes instead), the word-level tokenizer of ``train/demo_data.py`` (its
vocabulary and ``<IMG_CONTEXT>`` id are the model's; a release preset keeps its larger vocabulary, of which the
tokenizer uses the first ids), and a synthetic meta-format dataset of ``--images`` JPEG photos
(``internvl_jax.samples.photo_like``) of varied sizes and aspect ratios, JPEG-quality augmentation on, so that
decoding, dynamic tiling (up to ``--max-patch`` tiles plus the thumbnail) and the per-tile re-encoding run on real
JPEG bytes. Conversations: one photo (8 in 10), two, or none, two or three turns of words the tokenizer knows.

Measured, on the same ``--steps`` batches:

1. input alone: the run's grain pipeline (``train.inputs.build_inputs`` of the same config: decoding, tiling,
   augmentation, tokenising, packing, ``--workers`` processes) builds the batches into memory, twice: the first
   pass reads the files cold, the second is the steady state and gives the batches of the other sides (the tiling
   is the original's PIL calls on the host, ``internvl_jax.processing.pil_tiles``: nothing compiles);
2. bare step: the trainer's step (``train.step.train_step_spec`` with the trainer's optimiser, schedule and
   trainable mask from ``train.optim``, compiled as ``bench/step.py`` compiles it), params initialised as the
   trainer does, on those batches already on the device, each call blocked on;
3. trainer: ``train.trainer.train`` of the same config in a fresh workdir: the grain pipeline feeding it live,
   ``shard_batch``, the jitted donated step, metrics to ``metrics.jsonl``, asynchronous orbax checkpoints every
   ``--save-every`` steps. Its step time is ``metrics.jsonl``'s ``seconds`` (the wall time of one loop
   iteration, host work included). Its host calls are timed by wrapping ``Inputs.next`` and ``Checkpoints.save``
   (nothing else changes; a save waits for the step's state, so its time includes the rest of that step). Its
   losses must equal the bare step's (same batches, same initial state). The report splits the trainer's time
   beyond the bare step's, batch by batch, into the steps that save or follow a save (orbax's asynchronous write
   shares the cores with the next step) and the others (the input, metrics and dispatch);
4. PyTorch eager: ``transformers.InternVLForConditionalGeneration`` (sdpa attention) of the same shapes, loaded
   with our initial params, ``torch.optim.AdamW`` with the same hyper-parameters and global-norm clipping, the same
   loss (``sum(loss_weights * CE) / sum(loss_weights)``, float32 logits) on the same packed batches, the valid
   tiles of each batch in order. Each packed row is one sequence: ``--torch-mask causal`` (default) puts a plain
   causal mask over it (the samples of a row see each other: the same FLOPs as ours, and sdpa's fused causal
   kernel, its fastest path), ``packed`` passes the restarting positions, from which transformers builds the
   block-diagonal mask of the samples, as ours does (then its first loss equals ours).

Each round runs 2-4 (``--rounds``, ABBA order: bare, trainer, PyTorch, then PyTorch, trainer, bare, ...), since this
machine's speed drifts by 2x within minutes; a side's step time is the mean of its steps 2..N (step 1 compiles or
warms up) averaged over the rounds. A persistent XLA compilation cache under the workdir makes the later rounds'
trainer (and grain workers) load their programs instead of compiling them again. Tokens/s count every position of
the rows (rows x max tokens, as the trainer's metrics do; the real-token fill is printed). Goals: trainer / bare
step >= 0.95 (input and checkpoints never the bottleneck), trainer / PyTorch >= 1.0. Model FLOPs per step are
``sharding.plan.model_flops`` (every tile slot counted: the ViT runs them all); MFU is against the device's peak as
``bench/step.py`` finds it (a measured float32 matmul rate on a CPU). On a CPU every side shares the cores with the
input pipeline, the checkpoint writer and anything else running: the load average is printed per round.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

GOAL_BARE, GOAL_TORCH = 0.95, 1.0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="'small' (see small_config) or a release preset's shapes")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of each side (the first is excluded)")
    p.add_argument("--rows", type=int, default=2, help="rows per step")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per packed row (the static L)")
    p.add_argument("--max-tiles", type=int, default=6, help="tile slots per row (the static T)")
    p.add_argument("--max-patch", type=int, default=4, help="max_dynamic_patch: tiles per image besides the thumbnail")
    p.add_argument("--workers", type=int, default=0, help="grain decoding processes (0: in the training process)")
    p.add_argument("--save-every", type=int, default=4, help="asynchronous checkpoint every N steps")
    p.add_argument("--images", type=int, default=48, help="JPEG photos in the synthetic dataset")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype of both sides (default: float32 on a CPU, bfloat16 on a GPU); params float32")
    p.add_argument("--remat", default="none", help="remat policy of ours (PyTorch keeps every activation)")
    p.add_argument("--attention", default="auto", help="ours' attention implementation (InternVLConfig.attention_impl)")
    p.add_argument("--scan-unroll", type=int, default=None,
                   help="ours' layers per scan iteration (TrainConfig.scan_unroll; default: every layer of the small "
                        "model, no loop; 1 with --preset)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three sides (ABBA order, against drift)")
    p.add_argument("--torch-mask", default="causal", choices=["causal", "packed"],
                   help="PyTorch's attention: causal over each whole row (sdpa's fastest path), or packed: the "
                        "block-diagonal mask of the samples, as ours (the same losses; transformers materialises it)")
    p.add_argument("--skip-torch", action="store_true", help="trainer and bare step only")
    p.add_argument("--workdir", default=None,
                   help="where data, metrics, checkpoints and the XLA cache go (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps must be at least 3 (step 1 compiles, and a mean needs two more)")
    return args


def _load_sibling(name: str):
    """bench/<name>.py as a module (the benches are scripts, not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------------------------
# The setting: model, tokenizer, data
# ----------------------------------------------------------------------------------------------


def small_config(tokenizer, max_patch: int):
    """InternVL2.5-1B's geometry (448 px tiles, 14 px patches, pixel shuffle 0.5: 256 tokens per tile; Qwen2 with
    biased qkv) with a 2-layer ViT of width 64 (one head of 64, InternViT's head size) and a 2-layer LLM of width
    256 (4 heads of 64, 2 KV heads); vocabulary and ``<IMG_CONTEXT>`` from ``tokenizer`` (a
    ``tokenizers.Tokenizer``)."""
    from internvl_jax.presets import get_preset
    from internvl_jax.processing.templates import IMG_CONTEXT_TOKEN

    base = get_preset("InternVL2_5-1B")
    vision = dataclasses.replace(base.vision, hidden_size=64, num_layers=2, num_heads=1, intermediate_size=256)
    text = dataclasses.replace(base.text, vocab_size=tokenizer.get_vocab_size(), hidden_size=256, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=1024)
    return base.replace(vision=vision, text=text, image_token_id=tokenizer.token_to_id(IMG_CONTEXT_TOKEN),
                        max_dynamic_patch=max_patch)


def preset_config(name: str, tokenizer, max_patch: int):
    """A release preset's shapes; its ``image_token_id`` becomes the tokenizer's (the vocabulary stays: the
    tokenizer's ids are its first rows)."""
    from internvl_jax.presets import get_preset
    from internvl_jax.processing.templates import IMG_CONTEXT_TOKEN

    base = get_preset(name)
    if base.text.vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"--preset {name}: its vocabulary of {base.text.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.get_vocab_size()}")
    return base.replace(image_token_id=tokenizer.token_to_id(IMG_CONTEXT_TOKEN), max_dynamic_patch=max_patch)


# (width, height) of the photos before a +-10% jitter: phone and camera shapes, portrait, panoramas, small crops
PHOTO_SIZES = ((640, 480), (1024, 768), (800, 800), (1280, 720), (600, 900), (1600, 900), (448, 448),
               (720, 1280), (1200, 400), (336, 500), (960, 640), (500, 375))


def _words(tokenizer) -> list[str]:
    """The tokenizer's word pieces (``" word"``), so that every generated text encodes without ``<unk>``."""
    return sorted(p for p in tokenizer.get_vocab() if p.startswith(" ") and p[1:].isalpha())


def write_dataset(folder: str, n: int, max_patch: int, seed: int) -> str:
    """``n`` JPEG photos under folder/images and a JSONL of conversations in the InternVL meta format; returns the
    meta path. Each record: one photo (8 in 10), two photos (1 in 10) or none, two or three turns; answers of
    20-200 known words."""
    from PIL import Image

    from internvl_jax.samples import photo_like
    from train.demo_data import build_demo_tokenizer

    rng = np.random.default_rng(seed)
    words = _words(build_demo_tokenizer())
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    names = []
    for i in range(n):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        w, h = (int(x * rng.uniform(0.9, 1.1)) for x in (w, h))
        names.append(f"{i:04d}.jpg")
        Image.fromarray(photo_like(w, h, seed=seed * 100003 + i)).save(
            os.path.join(folder, "images", names[-1]), "JPEG", quality=90)

    def text(lo, hi):
        return "".join(rng.choice(words, int(rng.integers(lo, hi)))).strip()

    path = os.path.join(folder, "photos.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(4 * n):  # each photo in ~4 records
            kind = rng.choice(["one", "two", "text"], p=[0.8, 0.1, 0.1])
            images = {"one": 1, "two": 2, "text": 0}[kind]
            turns = []
            for t in range(int(rng.integers(2, 4))):
                turns += [{"from": "human", "value": ("<image>\n" * images if t == 0 else "") + text(5, 20) + "?"},
                          {"from": "gpt", "value": text(20, 200)}]
            record = {"id": i, "conversations": turns}
            if images:
                picks = [names[int(j)] for j in rng.choice(n, images, replace=False)]
                record["image"] = picks[0] if images == 1 else picks
            f.write(json.dumps(record) + "\n")
    meta = os.path.join(folder, "meta.json")
    with open(meta, "w", encoding="utf-8") as f:
        json.dump({"bench_photos": {"root": os.path.join(folder, "images"), "annotation": path, "data_augment": True,
                                    "max_dynamic_patch": max_patch, "repeat_time": 1, "length": 4 * n}}, f, indent=2)
    return meta


def train_config(args, model, meta: str, tokenizer: str, workdir: str, dtype: str):
    """The TrainConfig every side runs (the bare step and PyTorch take its optimiser settings)."""
    from train.config import DataConfig, TrainConfig
    from train.optim import OptimConfig

    return TrainConfig(
        name="bench", workdir=workdir, model=model, tokenizer=tokenizer, steps=args.steps, seed=args.seed,
        dtype=dtype, remat=args.remat, attention=args.attention, mesh="1,-1,1", rules="fsdp",
        scan_unroll=args.scan_unroll or (max(model.vision.num_layers, model.text.num_layers)
                                         if args.preset == "small" else 1),
        log_every=max(1, args.steps // 3), save_every=args.save_every, keep=2, progress=False,
        data=DataConfig(meta=meta, rows=args.rows, max_tokens=args.max_tokens, max_tiles=args.max_tiles,
                        loss_weighting="square", workers=args.workers),
        optim=OptimConfig(lr=1e-4, warmup_steps=2, weight_decay=0.05, max_grad_norm=1.0))


def run_config(cfg, model):
    """The model config the trainer runs (float32 master params, the run's compute dtype, remat, attention)."""
    return model.replace(dtype=cfg.dtype, param_dtype="float32", remat=cfg.remat, attention_impl=cfg.attention,
                         scan_unroll=cfg.scan_unroll)


# ----------------------------------------------------------------------------------------------
# The sides
# ----------------------------------------------------------------------------------------------


def prebuild(cfg, config):
    """(host batches, host stats, seconds per batch, CPU seconds per batch): the run's pipeline, drained of
    ``cfg.steps`` batches."""
    from train.inputs import build_inputs

    inputs = build_inputs(cfg, config)
    batches, stats, times, cpu = [], [], [], []
    try:
        for _ in range(cfg.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            batch, s = inputs.next()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            batches.append(batch)
            stats.append(s)
    finally:
        inputs.close()
    return batches, stats, times, cpu


class BareStep:
    """The trainer's step compiled as ``bench/step.py`` compiles it, from the trainer's initial state."""

    def __init__(self, cfg, config):
        import jax

        import sharding
        from internvl_jax.model import InternVL, _dummy_inputs
        from train import optim
        from train.config import optim_config
        from train.state import TrainState
        from train.step import train_step_spec

        self.mesh = sharding.make_mesh(*(int(s) for s in cfg.mesh.split(",")))
        self.rules, self.cfg, self.config = cfg.rules, cfg, config
        model = InternVL(config)
        self.init = lambda: sharding.init_sharded(  # noqa: E731 - the trainer's initialisation, same seed
            lambda r: model.init(r, *_dummy_inputs(config))["params"], self.mesh, cfg.rules,
            jax.random.PRNGKey(cfg.seed))
        ocfg = optim_config(cfg, config)
        params = self.init()
        self.tx = optim.build_optimizer(ocfg, params, cfg.steps)
        self.spec = train_step_spec(
            config, self.mesh, cfg.rules, self.tx, rows=cfg.data.rows, seq_len=cfg.data.max_tokens,
            tiles=cfg.data.max_tiles, lr_fn=optim.schedule(ocfg, cfg.steps),
            trainable=optim.trainable_mask(ocfg, params),
            grad_view=lambda g: optim.trainable_grads(ocfg, g, g), vocab_chunk=cfg.vocab_chunk or None)
        t0 = time.perf_counter()
        self.compiled, self.stats = self.spec.compile(self.mesh, cfg.rules)
        self.compile_s = time.perf_counter() - t0
        self.create = jax.jit(lambda p, k: TrainState.create(p, self.tx, k), out_shardings=self.spec.in_shardings[0],
                              donate_argnums=(0,))

    def run(self, batches) -> tuple[list[float], list[float]]:
        """(seconds per step, losses) over the device batches, from the initial state."""
        import jax

        import sharding

        params = self.init()  # outside activate(), as the trainer: unboxing under active rules adds constraints
        with sharding.activate(self.mesh, self.rules):
            state = self.create(params, jax.random.PRNGKey(self.cfg.seed + 1))
        times, losses = [], []
        for batch in batches:
            t0 = time.perf_counter()
            state, metrics = self.compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
        return times, losses


class Timed:
    """Wraps a method of a class with a timer for the duration of a ``with`` block (calls' seconds in ``calls``)."""

    def __init__(self, cls, name: str):
        self.cls, self.name, self.calls = cls, name, []

    def __enter__(self):
        self.original = getattr(self.cls, self.name)
        original, calls = self.original, self.calls

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                calls.append(time.perf_counter() - t0)

        setattr(self.cls, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.cls, self.name, self.original)


def run_trainer(cfg):
    """(metrics records, host seconds per ``Inputs.next``, per ``Checkpoints.save``, wall seconds)."""
    from train.checkpoint import Checkpoints
    from train.inputs import Inputs
    from train.trainer import train

    t0 = time.perf_counter()
    with Timed(Inputs, "next") as nxt, Timed(Checkpoints, "save") as save:
        result = train(cfg)
    return result, nxt.calls, save.calls, time.perf_counter() - t0


class TorchSide:
    """transformers + torch AdamW from our initial ``params`` (host arrays, through the hf export table), restarted
    from them on every :meth:`run`."""

    def __init__(self, config, ocfg, params, device: str, dtype: str, mask: str):
        import torch
        import transformers

        from convert.keymaps import LAYOUTS
        from convert.load import export_tensors
        from internvl_jax.config import to_hf_dict

        self.torch, self.device, self.ocfg, self.mask = torch, device, ocfg, mask
        self.tdtype = getattr(torch, dtype)
        with torch.device(device):
            self.model = transformers.InternVLForConditionalGeneration._from_config(
                transformers.InternVLConfig(**to_hf_dict(config)), attn_implementation="sdpa", dtype=self.tdtype)
        layout = LAYOUTS["hf"]  # export writes save_pretrained's names; the modules have their in-memory ones
        names = {layout.canonical(k): k for k in self.model.state_dict()}
        self.initial = {names.get(layout.canonical(k), k): torch.tensor(np.asarray(v, np.float32))
                        for k, v in export_tensors(params, config, layout)}
        missing, unexpected = self.model.load_state_dict(self.initial, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"bench/trainer.py: our params do not fill the transformers model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        self.model.train()

    def batches(self, batches):
        """Our host batches as PyTorch inputs: ids, positions, labels, weights [B, L]; the valid tiles
        [N, 3, S, S] in order, normalised as the original's transform does (None for a batch of text-only rows)."""
        from internvl_jax.processing import normalize

        torch, out = self.torch, []
        for b in batches:
            tiles = normalize(np.asarray(b["pixel_values"])[np.asarray(b["tile_mask"])])
            out.append({
                "input_ids": torch.tensor(b["input_ids"], dtype=torch.long, device=self.device),
                "position_ids": torch.tensor(np.asarray(b["positions"]), dtype=torch.long, device=self.device),
                "labels": torch.tensor(b["labels"], dtype=torch.long, device=self.device),
                "loss_weights": torch.tensor(b["loss_weights"], dtype=torch.float32, device=self.device),
                "pixel_values": torch.tensor(tiles.transpose(0, 3, 1, 2), device=self.device, dtype=self.tdtype)
                if len(tiles) else None,
            })
        return out

    def run(self, batches) -> tuple[list[float], list[float]]:
        """(seconds per step, losses) over ``self.batches(...)`` from the initial weights and a fresh AdamW."""
        torch, ocfg, model = self.torch, self.ocfg, self.model
        model.load_state_dict(self.initial, strict=False)
        opt = torch.optim.AdamW(model.parameters(), lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps,
                                weight_decay=ocfg.weight_decay)
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        times, losses = [], []
        for b in batches:
            sync()
            t0 = time.perf_counter()
            # packed: restarting position ids and no cache make transformers build the block-diagonal causal mask
            # of the packed samples (masking_utils.find_packed_sequence_indices); causal: positions 0..L-1 and a
            # plain causal mask over the whole row
            kw = {"position_ids": b["position_ids"]} if self.mask == "packed" else {}
            logits = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], use_cache=False, **kw).logits
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(),
                                                   ignore_index=-100, reduction="none")
            w = b["loss_weights"].flatten()
            loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
            loss.backward()
            if ocfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            sync()
            times.append(time.perf_counter() - t0)
        return times, losses


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def side_line(name: str, seconds: float, tokens: int, flops: float, peak: float, extra: str = "") -> str:
    return (f"{name:<22} {seconds:7.3f} s/step  {tokens / seconds:9,.0f} tokens/s  {flops / seconds / 1e12:6.3f} "
            f"TFLOP/s = MFU {flops / seconds / peak:5.1%}{extra}")


def ratio_line(name: str, value: float, goal: float) -> str:
    return f"{name} = {value:.3f}   (goal >= {goal:.2f}: {'met' if value >= goal else 'NOT met'})"


def overhead_line(rounds: list[dict], save_every: int, steps: int) -> str:
    """Where the trainer's time beyond the bare step goes: the mean difference of the two on the same batch, at the
    steps that save a checkpoint or follow one (its asynchronous write overlaps the next step) and at the others."""
    near = {s for s in range(2, steps + 1) if s % save_every == 0 or s == steps or (s - 1) % save_every == 0}
    far = set(range(2, steps + 1)) - near
    diff = lambda group: statistics.mean(g["trainer_steps"][s - 1] - g["bare_steps"][s - 1]  # noqa: E731
                                         for g in rounds for s in group)
    return (f"trainer - bare step on the same batch: {diff(near):+.3f} s at a save and the step after it (steps "
            f"{', '.join(map(str, sorted(near)))}), {diff(far):+.3f} s at the others (steps "
            f"{', '.join(map(str, sorted(far)))})" if far and near else "")


def main():
    args = parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares a GPU with JAX
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    # every round's trainer compiles the same step again: from disk
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(workdir), "xla_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import jax

    import sharding
    from sharding.plan import model_flops
    from train.config import optim_config
    from train.demo_data import build_demo_tokenizer, write_demo_tokenizer

    gpu = jax.default_backend() == "gpu"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; load average "
          f"{load_average()}; workdir {workdir}")

    # --- the setting -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    tok = build_demo_tokenizer()
    tokenizer = write_demo_tokenizer(os.path.join(workdir, "tokenizer"))
    model = (small_config(tok, args.max_patch) if args.preset == "small"
             else preset_config(args.preset, tok, args.max_patch))
    meta = write_dataset(os.path.join(workdir, "data"), args.images, args.max_patch, args.seed)
    run_dir = os.path.join(workdir, "run")
    cfg = train_config(args, model, meta, tokenizer, run_dir, dtype)
    config = run_config(cfg, model)
    t, v = config.text, config.vision
    print(f"model: {args.preset}: ViT {v.num_layers} x {v.hidden_size} ({v.image_size} px tiles, {v.patch_size} px "
          f"patches, {config.tokens_per_tile} tokens per tile), LLM {t.num_layers} x {t.hidden_size}, vocabulary "
          f"{t.vocab_size}; {dtype} compute, float32 params, remat {cfg.remat}, attention {cfg.attention}, scan unroll "
          f"{cfg.scan_unroll}")
    print(f"data: {args.images} JPEG photos, {4 * args.images} conversations, max_dynamic_patch {args.max_patch} + "
          f"thumbnail, JPEG augmentation on (written in {time.perf_counter() - t0:.1f} s); {args.rows} rows x "
          f"{args.max_tokens} tokens, {args.max_tiles} tile slots per row, {args.workers} workers; "
          f"{args.steps} steps, checkpoint every {args.save_every}")
    tokens = args.rows * args.max_tokens
    flops = model_flops(config, args.rows, args.max_tokens, args.max_tiles, devices=1)
    step_mod = _load_sibling("step")
    peak, peak_what = step_mod.device_peak(jax.numpy.dtype(dtype))
    peak *= 1 if jax.default_backend() == "cpu" else jax.device_count()
    print(f"model FLOPs per step {flops:.3e}; peak {peak / 1e12:.2f} TFLOP/s ({peak_what})")

    # --- 1. input alone ------------------------------------------------------------------------------
    _, _, cold_times, _ = prebuild(cfg, config)  # the files read cold
    host, stats, input_times, input_cpu = prebuild(cfg, config)  # the same batches again: the steady state
    fill = statistics.mean(s["token_fill"] for s in stats)
    tile_fill = statistics.mean(s["tile_fill"] for s in stats)
    samples = sum(s["samples"] for s in stats)
    tiles = sum(int(np.asarray(b["tile_mask"]).sum()) for b in host)
    print(f"input alone: {statistics.mean(input_times):.3f} s per batch ({sum(input_times) / tiles:.3f} s per tile; "
          f"CPU {statistics.mean(input_cpu):.3f} s per batch, this process's threads; the first, cold pass "
          f"{statistics.mean(cold_times):.2f} s per batch); {samples} samples and {tiles} tiles "
          f"in {args.steps} batches, token fill {fill:.1%}, tile fill {tile_fill:.1%}")

    # --- 2-4. rounds of bare step, trainer and PyTorch --------------------------------------------------
    bare = BareStep(cfg, config)
    device_batches = [sharding.shard_batch(b, bare.mesh, cfg.rules) for b in host]
    print(f"bare step compiled in {bare.compile_s:.1f} s (arguments {bare.stats.argument_bytes / 2**30:.2f} GiB, "
          f"temporaries {bare.stats.temp_bytes / 2**30:.2f} GiB)")
    torch_side = None
    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        torch_side = TorchSide(config, optim_config(cfg, config), jax.device_get(bare.init()), device, dtype,
                               args.torch_mask)
        torch_batches = torch_side.batches(host)
        print(f"PyTorch {torch.__version__} eager on {device} ({torch.get_num_threads()} threads), transformers "
              f"{transformers.__version__}, sdpa attention, {args.torch_mask} mask")

    def show(name, times):
        print(f"  {name:<8}" + " ".join(f"{x:6.2f}" for x in times))

    rounds = []
    for r in range(args.rounds):
        sides = ["bare", "trainer", "torch"] if r % 2 == 0 else ["torch", "trainer", "bare"]  # ABBA against drift
        print(f"round {r + 1} ({', '.join(sides)}), load average {load_average()}; seconds per step:")
        got = {}
        for side in sides:
            if side == "bare":
                times, bare_losses = bare.run(device_batches)
                got["bare"], got["bare_steps"] = statistics.mean(times[1:]), times
                show("bare", times)
            elif side == "torch" and torch_side:
                times, torch_losses = torch_side.run(torch_batches)
                got["torch"] = statistics.mean(times[1:])
                show("pytorch", times)
            elif side == "trainer":
                run = cfg.replace(workdir=f"{run_dir}{r + 1}")
                shutil.rmtree(run.workdir, ignore_errors=True)  # a run left there would be resumed, not timed
                result, next_calls, save_calls, wall = run_trainer(run)
                assert result.model.config == config, "bench/trainer.py's model config differs from the trainer's"
                records = result.metrics
                seconds = [rec["seconds"] for rec in records]
                got["trainer"], got["trainer_steps"] = statistics.mean(seconds[1:]), seconds
                show("trainer", seconds)
                print(f"    trainer: wall {wall:.1f} s (compile and the final save included); host calls per step: "
                      f"Inputs.next {statistics.mean(next_calls[1:]):.3f} s, Checkpoints.save "
                      f"{statistics.mean(save_calls):.3f} s (it waits for the step's state)")
                losses = [rec["loss"] for rec in records]
        diff = max(abs(a - b) for a, b in zip(losses, bare_losses))
        line = f"    losses: trainer {losses[0]:.4f} -> {losses[-1]:.4f}, max |trainer - bare step| {diff:.1e}"
        if torch_side:
            why = ("the same math" if args.torch_mask == "packed" else
                   "its causal mask lets a row's samples see each other")
            line += (f"; PyTorch's first {torch_losses[0]:.6f} vs ours {losses[0]:.6f} (same params and batch, {why}; "
                     "later ones differ: ours warms the lr up and decays fewer tensors)")
        print(line)
        rounds.append(got)

    # --- report -----------------------------------------------------------------------------------------
    mean = lambda key: statistics.mean(g[key] for g in rounds)  # noqa: E731
    trainer_s, bare_s = mean("trainer"), mean("bare")
    print(f"\nmeans of steps 2..{args.steps} over {args.rounds} rounds, {tokens} positions per step ({fill:.0%} real "
          f"tokens); load average {load_average()}")
    print(side_line("trainer", trainer_s, tokens, flops, peak))
    print(side_line("bare step", bare_s, tokens, flops, peak))
    if torch_side:
        print(side_line("PyTorch eager", mean("torch"), tokens, flops, peak))
    overhead = overhead_line(rounds, cfg.save_every, args.steps)
    if overhead:
        print(overhead)
    per_round = lambda a, b: ", ".join(f"{g[b] / g[a]:.3f}" for g in rounds)  # noqa: E731
    print(ratio_line("trainer / bare step", bare_s / trainer_s, GOAL_BARE)
          + f"   per round {per_round('trainer', 'bare')}")
    if torch_side:
        print(ratio_line("trainer / pytorch", mean("torch") / trainer_s, GOAL_TORCH)
              + f"   per round {per_round('trainer', 'torch')}")

if __name__ == "__main__":
    main()
