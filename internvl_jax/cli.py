"""The ``internvl-jax`` command line: ``info``, ``convert``, ``export``, ``chat``, ``plan``, ``train`` and ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time


def _looks_like_path(name: str) -> bool:
    """A name no preset can have: absolute, relative to ``.`` or ``~``, a ``.json`` file or more than one folder
    deep (a preset may carry one hub prefix, ``OpenGVLab/InternVL2_5-8B``)."""
    return name.startswith(("/", ".", "~")) or name.endswith(".json") or name.count("/") > 1


def model_config(name_or_path: str):
    """The config of a checkpoint folder (its config.json), a config.json file or a preset name."""
    from .config import load_config
    from .presets import get_preset

    if os.path.isdir(name_or_path) or (name_or_path.endswith(".json") and os.path.exists(name_or_path)):
        return load_config(name_or_path)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"{name_or_path} does not exist: expected a checkpoint folder with config.json "
                                "(or a preset name)")
    return get_preset(name_or_path)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def describe(config) -> list[str]:
    """Human-readable architecture lines for a config."""
    v, t = config.vision, config.text
    rope = t.rope.type + (f" x{t.rope.factor}" if t.rope.factor else "") + f", theta {t.rope.theta:g}"
    return [
        f"vision: InternViT hidden {v.hidden_size}, {v.num_layers} layers, {v.num_heads} heads, MLP {v.intermediate_size}, "
        f"{v.norm_type} eps {v.norm_eps:g}, qk-norm {'yes' if v.qk_norm else 'no'}, qkv bias {'yes' if v.qkv_bias else 'no'}, "
        f"patch {v.patch_size}, image {config.image_size}",
        f"projector: pixel shuffle {config.ps_version} (ratio {config.downsample_ratio}) -> "
        f"LayerNorm {v.hidden_size * round(1 / config.downsample_ratio) ** 2} -> MLP -> {t.hidden_size}; "
        f"{_plural(config.tokens_per_tile, 'token')} per tile",
        f"language model: {t.family}, hidden {t.hidden_size}, {t.num_layers} layers, {t.num_heads} heads "
        f"({t.num_kv_heads} KV, head dim {t.head_dim}), MLP {t.intermediate_size}, vocab {t.vocab_size}, "
        f"rope {rope}, max positions {t.max_position_embeddings}, "
        f"{'tied' if t.tie_word_embeddings else 'untied'} head",
        f"template: {config.template or 'transformers-native chat template'}, "
        f"tiles {config.min_dynamic_patch}..{config.max_dynamic_patch}"
        f"{' + thumbnail' if config.use_thumbnail else ''}, IMG_CONTEXT id {config.image_token_id}",
    ]


def cmd_info(args) -> None:
    import jax
    import numpy as np

    from .model import abstract_params

    config = model_config(args.model)
    tree = abstract_params(config)
    count = lambda sub: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(sub))  # noqa: E731
    for line in describe(config):
        print(line)
    for part in ("vision", "projector", "language_model"):
        print(f"{part} parameters: {count(tree[part]):,}")
    print(f"parameters: {count(tree):,}")


def _use_cpu_devices(n: int) -> None:
    """Simulate ``n`` devices on a CPU host. XLA reads the flag when the backend starts (the first computation),
    so it works after ``import jax`` as long as nothing has run yet; GPU and TPU hosts ignore it."""
    flag = f"--xla_force_host_platform_device_count={n}"
    if n and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def _run_training(config_name: str, overrides: list[str]):
    """Load, override, set up and run a train config; returns (config, result)."""
    import logging

    from train.config import apply_overrides, load_train_config, prepare, validate

    cfg = apply_overrides(load_train_config(config_name), overrides)
    if not cfg.setup:  # a setup hook fills in what it writes (the demo's data); check the rest after it
        validate(cfg)
    _use_cpu_devices(cfg.cpu_devices)
    from sharding.distributed import initialize

    # joins the other processes when INTERNVL_COORDINATOR & co. are set, or by JAX's own cluster detection (TPU
    # pods, SLURM) when INTERNVL_DISTRIBUTED=auto; alone otherwise
    initialize(auto=os.environ.get("INTERNVL_DISTRIBUTED") == "auto")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # orbax installs a root handler
    logging.getLogger("absl").setLevel(logging.WARNING)
    # JAX logs its backend probes at INFO ("Unable to initialize backend 'tpu'" on a host without TPU): not news
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from train.trainer import train

    cfg = prepare(cfg)
    try:
        return cfg, train(cfg)
    except KeyboardInterrupt:
        raise SystemExit(f"internvl-jax train: interrupted; rerun the same command to resume {cfg.workdir} from its "
                         "last checkpoint") from None


def cmd_train(args) -> None:
    cfg, result = _run_training(args.config, args.overrides)
    last = result.metrics[-1] if result.metrics else {}
    print(f"trained {cfg.name} to step {int(result.state.step)} in {cfg.workdir}"
          + (f": loss {last['loss']:.4f}" if "loss" in last else "")
          + (f", held-out loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))


def _new_folder(prefix: str) -> str:
    """A new uniquely named folder in the temporary directory, with the permissions the umask gives (mkdtemp's
    are 0700 whatever the umask)."""
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    return path


def cmd_demo(args) -> None:
    workdir = args.workdir or _new_folder("internvl-demo-")
    overrides = [f"workdir={workdir}"] + ([f"steps={args.steps}"] if args.steps else [])
    print(f"demo: synthetic visual question answering in {workdir}; the train config is `demo` "
          f"(internvl-jax train demo workdir={workdir} resumes it)")
    cfg, result = _run_training("demo", overrides)
    from convert.load import load_pretrained

    from train.demo import heldout_accuracy, heldout_records
    from .chat import chat
    from .generate import unrolled_params
    from .processing.processor import Processor

    export = os.path.join(cfg.workdir, "export")
    model, params = load_pretrained(export)
    params = unrolled_params(params, model.config)
    processor = Processor.from_pretrained(export)
    records = heldout_records(cfg)
    print(f"exported checkpoint {export} reloaded; answering {len(records)} held-out questions by greedy decoding")
    accuracy, per_kind = heldout_accuracy(model, params, processor, records)
    print("per question kind: " + ", ".join(f"{k} {v:.1%}" for k, v in per_kind.items()))
    for r in records[: args.show]:
        q, truth = r["conversations"][0]["value"], r["conversations"][1]["value"]
        answer = chat(model, params, processor, q, images=[r["image"]], generation_config={"max_new_tokens": 4})
        print(f"  {os.path.basename(r['image'])}: {q.splitlines()[-1]} -> {answer} (truth: {truth})")
    print(f"held-out accuracy: {accuracy:.3f}")


@contextlib.contextmanager
def _interrupt_in_one_line(args):
    """Ctrl-C or SIGTERM while writing ``args.dst``: one line and the shell's exit code (130, 143), no traceback;
    the staging folder is already removed."""
    from convert.staging import Terminated

    try:
        yield
    except KeyboardInterrupt as e:
        print(f"internvl-jax {args.command}: {str(e) or 'interrupted'}; {args.dst} is as it was or complete, nothing "
              "half-written is left", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None


def cmd_convert(args) -> None:
    from convert.to_orbax import convert_checkpoint

    with _interrupt_in_one_line(args):
        dtype = convert_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=True)
    print(f"wrote {args.dst} (orbax params in {dtype}, config and tokenizer files)")


def cmd_export(args) -> None:
    from convert.export import export_checkpoint
    from convert.load import checkpoint_dtype, load_pretrained
    from convert.staging import prepare_destination

    prepare_destination(args.dst, overwrite=args.overwrite)  # fails before the whole model is loaded
    with _interrupt_in_one_line(args):
        args.dtype = args.dtype or checkpoint_dtype(args.src)
        if args.adapter:  # merged: the plain model's kernels with the adapter folded in
            from convert.peft import load_with_adapter

            model, params = load_with_adapter(args.src, args.adapter, dtype=args.dtype, merge=True)
        else:
            model, params = load_pretrained(args.src, dtype=args.dtype)
        export_checkpoint(params, model.config, args.dst, layout=args.layout, overwrite=args.overwrite,
                          progress=True, side_files_from=args.src)
    merged = f", adapter {args.adapter} merged" if args.adapter else ""
    print(f"wrote {args.dst} ({args.layout} layout, {args.dtype}{merged})")


class Working:
    """A step that may take minutes, shown on stderr: its name at once, then the elapsed seconds every ``every``
    seconds until :meth:`stop` (or the end of a ``with`` block), then its duration; so that compiling never looks
    like a hang."""

    def __init__(self, message: str, *, every: float = 10.0, stream=None):
        self.message, self.stream = message, stream or sys.stderr
        self._t0, self._done = time.perf_counter(), threading.Event()
        print(f"{message} ...", file=self.stream, flush=True)
        self._thread = threading.Thread(target=self._tick, args=(every,), daemon=True)
        self._thread.start()

    def _tick(self, every: float) -> None:
        while not self._done.wait(every):
            print(f"  ... {time.perf_counter() - self._t0:.0f} s", file=self.stream, flush=True)

    def stop(self, *, report: bool = True) -> None:
        """End the step, printing its duration if ``report`` (once: later calls do nothing)."""
        if self._done.is_set():
            return
        self._done.set()
        self._thread.join()
        if report:
            print(f"  done in {time.perf_counter() - self._t0:.1f} s", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.stop(report=kind is None)  # an error speaks for itself: no "done" line


def _check_chat_args(args, config) -> None:
    """What ``chat`` can refuse before loading any weights (``config``: the checkpoint's, from config.json)."""
    from .generate import GenerationArgumentError, check_max_new_tokens, check_sampling

    if args.question is not None and not args.question.strip():
        raise GenerationArgumentError("the question is empty: expected a question, or none at all for an "
                                      "interactive session")
    if args.max_tiles is not None and args.max_tiles < 1:
        raise GenerationArgumentError(f"--max-tiles is {args.max_tiles}: expected a positive tile budget")
    check_max_new_tokens(args.max_new_tokens)
    check_sampling(args.do_sample, args.temperature, args.top_k, args.top_p, config.text.vocab_size)
    if args.best_of is None:
        if args.critic:
            raise ValueError("--critic needs --best-of N (the candidates it chooses among)")
        return
    if args.best_of < 1:
        raise GenerationArgumentError(f"--best-of is {args.best_of}: expected a positive number of candidates")
    if args.question is None:
        raise ValueError("--best-of needs the question on the command line (it answers one question, no session)")
    if args.select == "critic" and not args.critic:
        raise ValueError("--best-of with --select critic needs --critic CRITIC_CKPT (or --select self-consistency "
                         "or logprob)")
    if args.critic and not os.path.isdir(args.critic):
        raise FileNotFoundError(f"critic checkpoint folder {args.critic} does not exist")


def _best_of(args, model, params, processor, images) -> None:
    """``chat --best-of N``: N sampled candidates, the progress on stderr, each candidate's scores and the choice."""
    from convert.load import load_pretrained

    from .best_of_n import best_of_n
    from .generate import unrolled_params
    from .processing.processor import Processor

    critic = critic_processor = None
    if args.critic:
        critic_processor = Processor.from_pretrained(args.critic)
        with Working(f"loading the critic {args.critic} in {args.dtype}"):
            critic_model, critic_params = load_pretrained(args.critic, dtype=args.dtype)
            critic = (critic_model, unrolled_params(critic_params, critic_model.config))
    generation = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed)
    working = Working(f"sampling {args.best_of} candidates (the first call compiles)")

    def progress(line):
        working.stop(report=False)
        print(line, file=sys.stderr, flush=True)

    with working:
        result = best_of_n((model, params), critic, processor, args.question, images, args.best_of,
                           method=args.select.replace("-", "_"), mode=args.critic_mode, how=args.aggregate,
                           generation_config=generation, critic_processor=critic_processor, max_tiles=args.max_tiles,
                           on_progress=progress)
    for i, c in enumerate(result.candidates):
        scores = "" if c.score is None else (f"critic {c.score:.3f} (steps " + " ".join(f"{v:.2f}" for v in
                                                                                       c.step_scores) + "), ")
        print(f"[{i}] {scores}mean log-prob {c.mean_logprob:.3f}, final answer {c.final_answer!r}")
    print(f"choice ({args.select}): candidate {result.choice}")
    print(result.answer)


def cmd_chat(args) -> None:
    from .processing.images import load_image

    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint folder {args.checkpoint} does not exist")
    if args.merge and not args.adapter:
        raise ValueError("--merge needs --adapter DIR (the PEFT LoRA adapter to merge)")
    _check_chat_args(args, model_config(args.checkpoint))
    images = [load_image(path) for path in args.image]  # unreadable files fail before the model loads
    from convert.load import load_pretrained

    from .chat import chat
    from .generate import unrolled_params
    from .processing.processor import Processor

    processor = Processor.from_pretrained(args.checkpoint)  # tokenizer errors too come before the weights
    with Working(f"loading {args.checkpoint} in {args.dtype}" + (f" with adapter {args.adapter}" if args.adapter
                                                                  else "")):
        if args.adapter:  # unmerged (the low-rank path in each layer) unless --merge
            from convert.peft import load_with_adapter

            model, params = load_with_adapter(args.checkpoint, args.adapter, dtype=args.dtype, merge=args.merge)
        else:
            model, params = load_pretrained(args.checkpoint, dtype=args.dtype)
        params = unrolled_params(params, model.config)  # the generation layout, once (not on every answer)
    if args.best_of is not None:
        _best_of(args, model, params, processor, images)
        return
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    def answer(question, history):
        media = {"images": images, "videos": args.video}  # every turn: the history keeps their placeholders
        # the first answer compiles the image, prefill and decode programs; later ones reuse them
        compiling = None if history else Working("compiling the image and generation programs (first answer)")

        def show(piece):
            if compiling:
                compiling.stop()
            print(piece, end="", flush=True)

        with compiling or contextlib.nullcontext():
            reply, history = chat(model, params, processor, question, history=history, generation_config=generation,
                                  return_history=True, max_tiles=args.max_tiles, on_text=show, **media)
        print()
        return history

    if args.question:
        answer(args.question, [])
        return
    history = []
    print("interactive chat; an empty line or Ctrl-D ends it")
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question:
            break
        history = answer(question, history)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internvl-jax", description="InternVL vision-language models in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a model's architecture and exact parameter count (allocates nothing)")
    info.add_argument("model", help="a preset name (e.g. InternVL2_5-8B) or a checkpoint folder with config.json")
    info.set_defaults(func=cmd_info)
    convert = sub.add_parser(
        "convert", help="convert a safetensors checkpoint (either layout) to an orbax checkpoint, in bounded memory")
    convert.add_argument("src", help="a checkpoint folder (original or transformers-native safetensors layout)")
    convert.add_argument("dst", help="the folder to write (written under a temporary name, renamed when complete)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="params dtype of the output (default: the checkpoint's own)")
    convert.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    convert.set_defaults(func=cmd_convert)
    export = sub.add_parser(
        "export", help="write a checkpoint as safetensors + config.json in either layout (PyTorch loads it)"
    )
    export.add_argument("src", help="a checkpoint folder (original or transformers-native safetensors layout)")
    export.add_argument("dst", help="the folder to write (written under a temporary name, renamed when complete)")
    export.add_argument("--layout", choices=["hf", "original", "internvl_g"], default="hf",
                        help="hf: transformers InternVLForConditionalGeneration; original: OpenGVLab custom code; "
                             "internvl_g: InternVL 1.0's original InternVLModel")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="tensor dtype of the output (default: the source's own, so a round trip is lossless)")
    export.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    export.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder to merge into the weights")
    export.set_defaults(func=cmd_export)
    chat = sub.add_parser("chat", help="ask a checkpoint about images or a video (streams the answer)")
    chat.add_argument("checkpoint", help="a checkpoint folder with its tokenizer (either layout)")
    chat.add_argument("question", nargs="?", help="the question; without it, an interactive session keeps history")
    chat.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    chat.add_argument("--video", action="append", default=[], help="a video file (8 frames, one tile each)")
    chat.add_argument("--max-tiles", type=int, default=None, help="tiles per image budget (default: the checkpoint's)")
    chat.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="params and compute dtype")
    chat.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit (default: 1024)")
    chat.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    chat.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    chat.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder to put on the checkpoint")
    chat.add_argument("--merge", action="store_true", help="with --adapter: merge it into the weights first "
                      "(default: unmerged, the adapters run beside the frozen kernels)")
    chat.add_argument("--best-of", type=int, default=None, metavar="N",
                      help="sample N candidate answers (one shared prefill) and print the one --select chooses")
    chat.add_argument("--critic", default=None, metavar="CRITIC_CKPT",
                      help="with --best-of: a process-reward critic checkpoint (VisualPRM format) scoring each step")
    chat.add_argument("--select", choices=["critic", "self-consistency", "logprob"], default="critic",
                      help="with --best-of: the critic's best answer score (default), the majority final answer, or "
                           "the policy's highest mean log-probability")
    chat.add_argument("--critic-mode", choices=["process", "outcome"], default="process",
                      help="the critic judges every step (process, default) or the whole answer once (outcome)")
    chat.add_argument("--aggregate", choices=["mean", "min", "last"], default="mean",
                      help="answer score from the step scores (default: mean)")
    chat.set_defaults(func=cmd_chat)
    train = sub.add_parser(
        "train", help="train or fine-tune (resumes when WORKDIR holds checkpoints)",
        description="Run a train config: a preset name or a .py file defining CONFIG = TrainConfig(...), then "
                    "key=value overrides (dotted keys: steps=100 optim.lr=1e-5 data.meta=meta.json).")
    train.add_argument("config", help="a preset (demo, internvl2_5_stage1, ...; train/configs/) or a config .py file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. workdir=runs/a")
    train.set_defaults(func=cmd_train)
    demo = sub.add_parser(
        "demo", help="generate a synthetic visual QA set, train a tiny InternVL on 8 simulated CPU devices, "
                     "report held-out accuracy (no downloads)")
    demo.add_argument("--workdir", default=None, help="the run's folder (default: a new temporary folder)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo config's)")
    demo.add_argument("--show", type=int, default=4, help="held-out questions answered through chat (default: 4)")
    demo.set_defaults(func=cmd_demo)
    from sharding.plan import add_parser as add_plan_parser

    add_plan_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from sharding.topology import quiet_tpu_runtime

    quiet_tpu_runtime()  # before any command starts JAX's backends or compiles for a TPU topology
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot place a positional after options ("chat CKPT --image F 'question'"): take it from the rest
    if args.command == "chat" and args.question is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.question, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (KeyError, ValueError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"internvl-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
