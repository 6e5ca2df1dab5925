"""The trainer: ``train(config)`` runs a :class:`~train.config.TrainConfig` on the mesh of ``sharding``.

One run = model and params (from ``init`` loaded straight into their shardings, or ``preset`` initialised in
them), the optimizer of ``train.optim`` (frozen parameters hold no state), the grain input of ``train.data``
(each process reads its own rows; ``sharding.shard_batch`` makes the global batch), the jitted and donated step
of ``train.step``, and ``train.checkpoint``. The objective picks the model, rows and step: ``sft`` and ``mpo``
train InternVL chat models, ``contrastive`` and ``generative`` InternVL 1.0 (InternVL-C / InternVL-G) on
image-text pairs (``train.clip_train``, ``train/data/captions.py``). A workdir that holds checkpoints resumes from the latest: params,
optimizer state, step, rng and the data iterator, so the resumed run sees exactly the batches and gives exactly
the losses of an uninterrupted one.

Per step, ``<workdir>/metrics.jsonl`` gets one JSON object (step, loss, grad_norm, lr, weight_sum, tokens,
tokens_per_s, mfu when the device peak is known, fill rates, skipped samples, ...), written as the step
completes; the console gets a progress bar and a line every ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from internvl_jax import lora
from internvl_jax.clip_config import CLIPConfig
from internvl_jax.clip_model import InternVLCLIP, abstract_clip_params, clip_init_fn
from internvl_jax.model import InternVL, _dummy_inputs, abstract_params
from sharding.distributed import is_main_process, main_process_logger
from sharding.plan import model_flops
from sharding.topology import CHIPS

from . import optim
from .checkpoint import Checkpoints, IteratorPosition
from .clip_train import make_clip_step
from .config import ConfigError, TrainConfig, check_batch_split, is_clip_run, lora_rules, optim_config, validate
from .inputs import Inputs, build_caption_inputs, build_inputs
from .preference_step import PreferenceState, abstract_preference_state, make_preference_step, preference_loss
from .reference_logps import check_reference, reference_table
from .state import TrainState, abstract_state
from .step import batch_shardings, loss_sum, make_train_step, uses_dropout

log = main_process_logger("internvl_jax.train")
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


class TrainingStopped(RuntimeError):
    """The run stopped early (too many non-finite losses)."""


@dataclass
class RunResult:
    """What a finished run leaves: its final state, the model, the processor and the last metrics."""

    state: TrainState
    model: InternVL | InternVLCLIP
    inputs: Inputs
    metrics: list[dict]
    resumed_from: int | None
    reference: object = None  # MPO with reference=copy: the frozen reference params


def device_peak_flops() -> float | None:
    """Dense bf16 FLOP/s of one device of this host, when known (TPU chips, H100/H200/A100); else None."""
    kind = jax.devices()[0].device_kind
    for name, peak in GPU_PEAK_FLOPS.items():
        if name in kind:
            return peak
    for chip in CHIPS.values():
        if jax.devices()[0].platform == "tpu" and chip.name.lower() in kind.lower().replace(" ", ""):
            return chip.peak_flops
    return None


def _mesh(cfg: TrainConfig):
    try:
        sizes = [int(s) for s in cfg.mesh.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise ConfigError(f"mesh={cfg.mesh!r}: expected data,fsdp,tensor sizes such as 1,-1,1")
    if cfg.rules not in sharding.RULES:
        raise ConfigError(f"rules={cfg.rules!r}: expected one of {', '.join(sharding.RULES)}")
    mesh = sharding.make_mesh(*sizes)
    check_batch_split(cfg, sharding.mesh_shape(mesh))
    return mesh


def _model_config(cfg: TrainConfig, base):
    """The checkpoint's or preset's config with this run's runtime settings (float32 master weights). A new
    ``image_size`` becomes the ViT's own size: its position table is resized once (:func:`_resize_positions`) and
    then trained at that size, as the original's ``resize_pos_embeddings``."""
    vision = base.vision if cfg.drop_path < 0 else dataclasses.replace(base.vision, drop_path_rate=cfg.drop_path)
    if cfg.image_size:
        vision = dataclasses.replace(vision, image_size=cfg.image_size)
    return base.replace(vision=vision, dtype=cfg.dtype, param_dtype="float32", remat=cfg.remat,
                        attention_impl=cfg.attention, scan_unroll=cfg.scan_unroll,
                        force_image_size=None if cfg.image_size else base.force_image_size)


def _resize_positions(params, config):
    """The ViT position table [1, 1 + g*g, C] of ``params`` resized (bicubic) to the grid of ``config``'s image
    size, the class position kept; params that already fit are returned as they are."""
    from internvl_jax.vision import resize_position_embedding

    table = params["vision"]["embeddings"]["pos_embed"]
    grid = config.vision.image_size // config.vision.patch_size
    if table.shape[1] == 1 + grid * grid:
        return params
    resized = jnp.concatenate([table[:, :1].astype(jnp.float32),
                               resize_position_embedding(table[0, 1:], grid, grid)[None]], axis=1)
    log.info("ViT position table resized from %d to %d positions (image size %d)", table.shape[1],
             resized.shape[1], config.vision.image_size)
    embeddings = {**params["vision"]["embeddings"], "pos_embed": resized.astype(table.dtype)}
    return {**params, "vision": {**params["vision"], "embeddings": embeddings}}


def _module(config):
    """The model of a config: InternVL, or InternVLCLIP for an InternVL 1.0 config."""
    return InternVLCLIP(config) if isinstance(config, CLIPConfig) else InternVL(config)


def _abstract_params(config):
    """The params' shapes, boxed with their logical axes."""
    return abstract_clip_params(config, boxed=True) if isinstance(config, CLIPConfig) else abstract_params(
        config, boxed=True)


def _initial_params(cfg: TrainConfig, mesh):
    """(model config, params in their shardings)."""
    if cfg.init:
        from convert.load import load_pretrained

        model, params = load_pretrained(cfg.init, dtype=jnp.float32, mesh=mesh, rules=cfg.rules)
        if isinstance(model.config, CLIPConfig) != is_clip_run(cfg):
            kind = "an InternVL 1.0" if isinstance(model.config, CLIPConfig) else "an InternVL chat"
            raise ConfigError(f"init={cfg.init} is {kind} checkpoint, which objective={cfg.objective} does not train "
                              "(InternVL 1.0 trains with objective=contrastive or generative)")
        config = _model_config(cfg, model.config)
        return config, _resize_positions(params, config)
    from internvl_jax.presets import CLIP_PRESETS, get_preset

    config = _model_config(cfg, cfg.model or (CLIP_PRESETS[cfg.preset] if is_clip_run(cfg) else get_preset(cfg.preset)))
    if isinstance(config, CLIPConfig):
        init = clip_init_fn(config)
    else:
        model = InternVL(config)
        init = lambda r: model.init(r, *_dummy_inputs(config))["params"]  # noqa: E731
    return config, sharding.init_sharded(init, mesh, cfg.rules, jax.random.PRNGKey(cfg.seed))


class MetricsLog:
    """``metrics.jsonl`` (process 0), appended one object per step, flushed as written; optional TensorBoard."""

    def __init__(self, workdir: str, tensorboard: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.file = open(self.path, "a") if is_main_process() else None
        self.tb = None
        if tensorboard and is_main_process():
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard=true needs the tensorboardX package (pip install tensorboardX)") from None
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate_preference(model, params, ref_params, shift, inputs: Inputs, mesh, rules, mpo, *, vocab_chunk) -> dict:
    """Held-out MPO metrics over ``inputs``' evaluation pairs (no update; the BCO shift stays as it is, unlike
    the original's evaluation, which moves it): ``eval_loss``, ``eval_accuracy`` (reward margin > 0),
    ``eval_margin``, ``eval_pairs``."""
    def sums(p, b, r):
        pairs, tokens = jnp.sum(b["pair_mask"].astype(jnp.float32)), jnp.sum(b["loss_weights"])
        loss, _, s = preference_loss(model, mpo, p, b, r, shift, pairs_total=pairs, tokens_total=tokens,
                                     vocab_chunk=vocab_chunk, update_shift=False)
        return loss * pairs, s["correct"], s["margin"], pairs

    fn = jax.jit(sums)
    total = np.zeros(4)
    with sharding.activate(mesh, rules):
        for batch in inputs.eval_batches():
            total += np.asarray(jax.device_get(fn(params, sharding.shard_batch(batch, mesh, rules), ref_params)))
    n = max(total[3], 1.0)
    return {"eval_loss": total[0] / n, "eval_accuracy": total[1] / n, "eval_margin": total[2] / n,
            "eval_pairs": total[3]}


def evaluate(model, params, inputs: Inputs, mesh, rules, *, vocab_chunk) -> dict:
    """Held-out loss: the weighted loss over ``inputs``' evaluation batches (no update)."""
    fn = jax.jit(lambda p, b: (loss_sum(model, p, b, vocab_chunk=vocab_chunk), jnp.sum(b["loss_weights"])))
    total = weights = 0.0
    with sharding.activate(mesh, rules):
        for batch in inputs.eval_batches():
            s, w = fn(params, sharding.shard_batch(batch, mesh, rules))
            total, weights = total + float(s), weights + float(w)
    return {"eval_loss": total / max(weights, 1e-12)}


def _with_adapters(cfg: TrainConfig, config, params, mesh):
    """(config with the run's LoRA table, params with fresh adapters in their shardings); unchanged without LoRA.
    Only the adapters are initialised: the jitted init returns nothing else, so XLA drops the base's init."""
    rules = lora_rules(cfg, config.text.family)
    if not rules:
        return config, params
    config = config.replace(lora=rules)
    model = InternVL(config)
    adapters = sharding.init_sharded(lambda r: lora.adapters_of(model.init(r, *_dummy_inputs(config))["params"]),
                                     mesh, cfg.rules, jax.random.PRNGKey(cfg.seed + 2))
    if not adapters:
        raise ConfigError(f"lora rules {rules} give no kernel of the model an adapter")
    return config, lora.combine(params, adapters)


def base_identity(cfg: TrainConfig) -> dict:
    """What the frozen base of a LoRA run is: the ``init`` folder with a digest of its config.json and its files'
    names and sizes (cheap for any size), or the preset and seed of a random base."""
    import hashlib

    if not cfg.init:
        if cfg.model is not None:  # a model written in the config: its architecture, digested
            return {"model": hashlib.sha256(repr(cfg.model).encode()).hexdigest(), "seed": cfg.seed}
        return {"preset": cfg.preset, "seed": cfg.seed}
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(cfg.init)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(f"{os.path.relpath(path, cfg.init)}:{os.path.getsize(path)};".encode())
            if name == "config.json":
                with open(path, "rb") as f:
                    digest.update(f.read())
    return {"init": os.path.abspath(cfg.init), "digest": digest.hexdigest()}


def _split_trainable(params, trainable):
    """(trainable params, frozen params) as two nested dicts, by the optimizer's trainable mask."""
    keep = {optim.param_path(p) for p, t in jax.tree_util.tree_flatten_with_path(trainable)[0] if t}
    return lora.partition(params, lambda path: path in keep)


def train(cfg: TrainConfig, *, on_step=None) -> RunResult:
    """Run (or resume) ``cfg``; returns the final state. ``on_step(record)`` is called with each step's metrics."""
    validate(cfg)
    os.makedirs(cfg.workdir, exist_ok=True)
    mesh = _mesh(cfg)
    config, params = _initial_params(cfg, mesh)
    config, params = _with_adapters(cfg, config, params, mesh)
    model = _module(config)
    mpo, clip = cfg.objective == "mpo", is_clip_run(cfg)
    from_file = mpo and cfg.mpo.reference == "file"
    references = {}  # reference log-probs from file, of the training pairs and of the held-out pairs
    for meta in (cfg.data.meta, cfg.data.eval_meta if cfg.data.eval_samples > 0 else "") if from_file else ():
        if meta:
            references[meta] = reference_table(cfg, model, params, mesh, base_identity(cfg), meta)
    inputs = build_caption_inputs(cfg, config) if clip else build_inputs(
        cfg, config, references.get(cfg.data.meta), references.get(cfg.data.eval_meta))
    ocfg = optim_config(cfg, config)
    trainable = optim.trainable_mask(ocfg, params)
    use_lora = not clip and bool(config.lora)
    if use_lora and cfg.lora.base_dtype == "bfloat16":  # the frozen base only: trained leaves stay float32
        params = jax.tree.map(lambda p, t: p if t else p.astype(jnp.bfloat16), params, trainable)
    tx = optim.build_optimizer(ocfg, params, cfg.steps)
    lr_fn = optim.schedule(ocfg, cfg.steps)
    boxed = _abstract_params(config)
    State = PreferenceState if mpo else TrainState
    state_sh = sharding.shardings((abstract_preference_state if mpo else abstract_state)(boxed, tx), mesh, cfg.rules)
    # MPO's frozen reference: a copy of the starting policy, sharded like it (rebuilt the same way on a resume)
    ref_params = jax.tree.map(jnp.copy, params) if mpo and not from_file else None
    with sharding.activate(mesh, cfg.rules):
        state = jax.jit(lambda p, k: State.create(p, tx, k), out_shardings=state_sh,
                        donate_argnums=(0,))(params, jax.random.PRNGKey(cfg.seed + 1))
    del params
    checkpoints = Checkpoints(cfg.workdir, save_every=cfg.save_every, keep=cfg.keep,
                              compress=cfg.checkpoint_compression)
    resumed = checkpoints.latest_step()
    host = {"skipped_samples": {}}
    identity = base_identity(cfg) if use_lora else None
    if use_lora:
        n_train = lora.count(_split_trainable(state.params, trainable)[0])
        log.info("LoRA: %d trainable parameters (adapters %d) on a frozen base of %d", n_train,
                 lora.count(lora.adapters_of(state.params)), lora.count(state.params) - n_train)

    def saved(state):
        """What a checkpoint holds: with LoRA the trainable params only (the base is named by ``identity``)."""
        return state.replace(params=_split_trainable(state.params, trainable)[0]) if use_lora else state

    if resumed is not None:
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                          state_sh)
        frozen = _split_trainable(state.params, trainable)[1] if use_lora else None
        del state
        state, meta = checkpoints.restore(resumed, saved(abstract), inputs.iterator)
        if use_lora:
            if meta.get("base") != identity:
                raise ConfigError(f"the checkpoints in {checkpoints.directory} were trained on the base "
                                  f"{meta.get('base')}, this run's is {identity}: LoRA checkpoints hold adapters only "
                                  "and resume on their own base (give that init, or a new workdir)")
            state = state.replace(params=lora.combine(state.params, frozen))
        host = meta.get("host", host)
        log.info("resumed from step %d of %s", resumed, checkpoints.directory)
    step_options = dict(trainable=trainable, grad_view=lambda g: optim.trainable_grads(ocfg, g, g),
                        accum_steps=cfg.accum_steps, vocab_chunk=cfg.vocab_chunk or None,
                        dropout=uses_dropout(config))
    if mpo:
        step_fn = make_preference_step(model, tx, cfg.mpo, lr_fn, **step_options)
    elif clip:  # one batch per step (validate: accum_steps 1); the contrastive terms gather over the mesh
        step_fn = make_clip_step(model, tx, cfg.objective, lr_fn, trainable=trainable,
                                 grad_view=step_options["grad_view"], mesh=mesh, rules=cfg.rules,
                                 dropout=step_options["dropout"])
    else:
        step_fn = make_train_step(model, tx, lr_fn, **step_options)
    batch_sh = batch_shardings(inputs.abstract_batch, mesh, cfg.rules)
    extra, extra_sh = ((ref_params,), (state_sh.params,)) if ref_params is not None else ((), ())
    with sharding.activate(mesh, cfg.rules):
        step_fn = jax.jit(step_fn, in_shardings=(state_sh, batch_sh) + extra_sh, out_shardings=(state_sh, None),
                          donate_argnums=(0,))
    metrics_log = MetricsLog(cfg.workdir, cfg.tensorboard)
    start = int(jax.device_get(state.step))
    peak = device_peak_flops()
    flops = None if clip else model_flops(config, cfg.data.rows, cfg.data.max_tokens, cfg.data.max_tiles, devices=1)
    run_meta = {"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    if use_lora:
        run_meta["base"] = identity
    records = []

    def held_out(state) -> dict:
        if mpo:
            return evaluate_preference(model, state.params, ref_params, state.shift, inputs, mesh, cfg.rules, cfg.mpo,
                                       vocab_chunk=cfg.vocab_chunk or None)
        return evaluate(model, state.params, inputs, mesh, cfg.rules, vocab_chunk=cfg.vocab_chunk or None)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.name}", unit="step",
               disable=not (cfg.progress and is_main_process()), dynamic_ncols=True)
    try:
        t_last = time.perf_counter()
        batch, stats = inputs.next() if start < cfg.steps else (None, None)
        if from_file and start == 0:  # the commonest cause of an abnormal first MPO loss: a wrong reference
            check_reference(model, state.params, batch, mesh, cfg.rules, cfg.mpo.max_pairs, cfg.vocab_chunk or None)
        for step in range(start, cfg.steps):
            with sharding.activate(mesh, cfg.rules):
                state, metrics = step_fn(state, sharding.shard_batch(batch, mesh, cfg.rules), *extra)
            for reason, n in stats.get("skipped", {}).items():
                host["skipped_samples"][reason] = host["skipped_samples"].get(reason, 0) + n
            due = (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps
            # the iterator has yielded exactly step + 1 batches: the position the checkpoint must hold
            position = IteratorPosition(inputs.iterator) if due else None
            if step + 1 < cfg.steps:
                next_batch, next_stats = inputs.next()  # host work while the device runs this step
            if due:  # after the input: the save waits for the step's state
                checkpoints.save(step + 1, saved(state), position, {**run_meta, "host": host},
                                 force=step + 1 == cfg.steps)
            m = _host(metrics)
            now = time.perf_counter()
            seconds, t_last = now - t_last, now
            record = {"step": step + 1, **m, "seconds": seconds,
                      "tokens_per_s": cfg.data.rows * cfg.data.max_tokens / seconds,
                      "token_fill": stats.get("token_fill"), "tile_fill": stats.get("tile_fill"),
                      "samples": stats.get("samples"), "skipped_samples": sum(host["skipped_samples"].values())}
            if peak and flops:
                record["mfu"] = flops / seconds / (peak * jax.device_count())
            if not m["finite"]:
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); the update was skipped",
                            step + 1, m["loss"], m["grad_norm"])
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and inputs.has_eval:
                record.update(held_out(state))
            records.append(record)
            metrics_log.write(record)
            if on_step:
                on_step(record)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log.info("step %d/%d: loss %.4f, grad norm %.3f, lr %.3e, %.0f tokens/s%s", step + 1, cfg.steps,
                         m["loss"], m["grad_norm"], m["lr"], record["tokens_per_s"],
                         f", reward margin {m['margin']:.4f}, preference accuracy {m['accuracy']:.3f}, shift "
                         f"{m['shift']:.4f}" if mpo else "")
            skipped = int(jax.device_get(state.skipped))
            if skipped > cfg.max_nonfinite:
                checkpoints.wait()
                raise TrainingStopped(f"{skipped} updates were skipped for a non-finite loss or gradient (more than "
                                      f"max_nonfinite={cfg.max_nonfinite}); the last good state is in the checkpoints")
            if step + 1 < cfg.steps:
                batch, stats = next_batch, next_stats
    finally:
        bar.close()
        checkpoints.close()
        metrics_log.close()
        inputs.close()
    if cfg.eval_every == 0 and inputs.has_eval:
        final = held_out(state)
        log.info("held-out loss: %.4f%s", final["eval_loss"],
                 f", preference accuracy {final['eval_accuracy']:.3f}" if mpo else "")
        if records:
            records[-1].update(final)
    if cfg.export:
        final = lora.merge(state.params, config.lora) if use_lora else state.params
        # InternVL 1.0: its original layout (internvl_g), the only one it has
        export(final, config if clip else config.replace(lora=()), os.path.join(cfg.workdir, "export"),
               "internvl_g" if clip else cfg.export, inputs)
        if use_lora:
            from convert.peft import save_adapter

            save_adapter(state.params, config, os.path.join(cfg.workdir, "adapter"), overwrite=True,
                         base_model=cfg.init or None, layout=cfg.lora.adapter_layout)
            log.info("LoRA adapter (PEFT format, %s module names) in %s", cfg.lora.adapter_layout,
                     os.path.join(cfg.workdir, "adapter"))
    return RunResult(state, model, inputs, records, resumed, ref_params)


def export(params, config, dst: str, layout: str, inputs: Inputs) -> None:
    """The params as safetensors in ``layout`` (hf | original) with the tokenizer files, through the export path."""
    from convert.export import export_checkpoint

    host_params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    export_checkpoint(host_params, config.replace(dtype="float32", param_dtype="float32", remat="none",
                                                  attention_impl="auto", scan_unroll=1),
                      dst, layout=layout, overwrite=True, side_files_from=inputs.tokenizer_dir)
    log.info("exported to %s (%s layout)", dst, layout)
