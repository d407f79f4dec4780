"""``leanlm`` command line: train, eval, generate, keys.

User mistakes (``LeanLMError``) print one line and exit 2; internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

# `generate` has no KV cache (a sanity check, not a server): each token is a full forward over the
# context, and the text is printed when done; 10,000 tokens is minutes on a CPU already.
MAX_NEW_TOKENS = 10_000

USAGE_EXAMPLES = """examples:
  leanlm train configs/tiny.yaml
  leanlm train configs/llama_60m.yaml data.source=hf:allenai/c4:en data.tokenizer=t5.model train.steps=10000
  leanlm train configs/tiny.yaml train.out_dir=runs/tiny train.resume=auto
  leanlm eval runs/tiny/checkpoints/step-00000300
  leanlm eval runs/tiny --tasks hellaswag,arc_easy --limit 200
  leanlm generate runs/tiny/checkpoints/step-00000300 --prompt "def main("
  leanlm export runs/tiny hf/tiny --dtype bf16
  leanlm cooldown runs/wsd_60m --at 4000 --steps 1000
  leanlm tokenize path/to/texts shards/texts --workers 2 && leanlm train tiny data.source=tokens:shards/texts
  leanlm memory configs/llama_7b.yaml optim.name=frugal optim.density=0 train.param_dtype=bf16
  leanlm fit runs/scaling_demo/* --budget 1e21 --plot fit.png
  leanlm keys
"""


def _number(kind: type, low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite ``kind`` in [low, high] (or (low, high] when ``low_open``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {bound}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one ``leanlm: error:`` line (exit 2) as config mistakes."""

    def error(self, message: str):
        self.exit(2, f"leanlm: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_fit(sub) -> None:
    """``leanlm fit``'s options (the longest list: its own function)."""
    f = sub.add_parser("fit", help="fit L(N, D) = E + A/N^α + B/D^β to runs or a CSV/JSONL of records")
    f.add_argument("inputs", nargs="+", help="run folders, scaling.jsonl files or ColPret-style CSVs")
    f.add_argument("--method", choices=["chinchilla", "colpret"], default="chinchilla")
    f.add_argument(
        "--grid",
        choices=["full", "small"],
        default="full",
        help="L-BFGS starting grid (chinchilla)",
    )
    f.add_argument(
        "--drop-fraction",
        type=_number(float, 0, 1),
        default=0.1,
        help="drop each run's checkpoints before this fraction of its tokens",
    )
    f.add_argument(
        "--budget",
        type=_number(float, 0, low_open=True),
        help="FLOP budget C: print the compute-optimal N and D",
    )
    f.add_argument(
        "--predict",
        type=_number(float, 0, low_open=True),
        nargs=2,
        metavar=("N", "D"),
        help="print the predicted loss at (N, D)",
    )
    f.add_argument(
        "--holdout",
        action="store_true",
        help="fit without the largest model; report ARE on its last 30%% of checkpoints",
    )
    f.add_argument(
        "--bootstrap",
        type=_number(int, 0),
        default=0,
        help="bootstrap rounds (runs are resampled whole) for 95%% intervals",
    )
    f.add_argument(
        "--all-points", action="store_true", help="use WSD runs' points before their decay too (default: cooled only)"
    )
    f.add_argument("--json", help="write the result as JSON here")
    f.add_argument("--plot", help="write a PNG of data vs fitted curves here")


def _add_export_and_cooldown(sub) -> None:
    """``leanlm export`` (to Hugging Face) and ``leanlm cooldown`` (WSD branches)."""
    x = sub.add_parser("export", help="write a checkpoint as a Hugging Face LlamaForCausalLM folder (+ tokenizer)")
    x.add_argument("checkpoint", help="a checkpoint folder or a run folder (newest checkpoint)")
    x.add_argument("out_dir", help="the folder to create (must not exist, or be empty)")
    x.add_argument("--dtype", choices=["fp32", "bf16"], help="tensor dtype; default the run's train.param_dtype")
    x.add_argument(
        "--max-shard-gb", type=_number(float, 0, low_open=True), default=5.0, help="largest safetensors file (GB)"
    )
    cd = sub.add_parser("cooldown", help="branch a WSD run's constant-phase checkpoint into a decay of its own")
    cd.add_argument("run", help="the run folder (optim.schedule=wsd or constant)")
    cd.add_argument("--at", type=_number(int, 1), required=True, help="the checkpoint step to branch from")
    cd.add_argument("--steps", type=_number(int, 1), required=True, help="decay steps")
    cd.add_argument("--out", help="the cooldown's run folder; default RUN-cooldown-AT+STEPS beside RUN")
    cd.add_argument("overrides", nargs="*", help="other overrides, e.g. optim.decay_shape=linear")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="leanlm",
        description="Memory-efficient LLaMA pretraining.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML preset plus key=value overrides")
    t.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 train.steps=2000")
    e = sub.add_parser("eval", help="held-out loss and perplexity of a checkpoint")
    e.add_argument(
        "checkpoint",
        help="a checkpoint folder (…/checkpoints/step-XXXXXXXX) or a run folder (newest)",
    )
    e.add_argument(
        "overrides",
        nargs="*",
        help="data.* / eval.* overrides, e.g. data.source=PATH eval.tokens=100000",
    )
    e.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs leanlm[eval])")
    e.add_argument("--include-path", help="a folder of lm_eval task YAML files (local tasks, offline)")
    e.add_argument("--limit", type=_number(int, 1), help="lm_eval: at most N documents per task")
    e.add_argument("--batch-size", type=_number(int, 1), default=8, help="lm_eval batch size")
    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint folder or a run folder (newest checkpoint)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=_number(int, 0, MAX_NEW_TOKENS), default=200)
    g.add_argument("--temperature", type=_number(float, 0), default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=_number(int, 0), default=50, help="0 = no top-k cut")
    g.add_argument("--seed", type=_number(int, 0, 2**63 - 1), default=0)
    _add_export_and_cooldown(sub)
    tk = sub.add_parser("tokenize", help="tokenize a source once into shards (train with data.source=tokens:DIR)")
    tk.add_argument("source", help="stdlib, a file or folder, or hf:NAME[:CONFIG]")
    tk.add_argument("out_dir", help="the shard folder (run the same command again to resume)")
    tk.add_argument("--tokenizer", default="", help="a .model, tokenizer.json or folder; default: train one")
    tk.add_argument("--vocab-size", type=_number(int, 300), default=4096, help="pieces of a trained tokenizer")
    tk.add_argument("--workers", type=_number(int, 1), default=1, help="tokenizing processes")
    tk.add_argument("--val-fraction", type=_number(float, 0, 0.99), default=0.02, help="held-out documents")
    tk.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/HF records")
    tk.add_argument("--hf-split", default="train", help="the split of an hf: source")
    tk.add_argument("--hf-data-files", nargs="*", default=None, help="data_files for builders such as hf:json")
    tk.add_argument("--unit-mb", type=_number(float, 0, low_open=True), default=256.0, help="text per shard (MB)")
    mm = sub.add_parser("memory", help="parameter, gradient, optimizer-state and activation memory of a config")
    mm.add_argument("config", help="YAML preset, e.g. configs/frugal_1b.yaml")
    mm.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. optim.name=frugal train.micro_batch_size=8",
    )
    mm.add_argument("--cpu", action="store_true", help="estimate for CPU training (fp32 activations)")
    mm.add_argument(
        "--world",
        type=_number(int, 1),
        default=1,
        help="ranks: per-rank figures under the config's distributed.backend (fsdp2, deepspeed)",
    )
    sc = sub.add_parser("scaling", help="scaling-law records: export runs' scaling.jsonl as a ColPret CSV")
    sc.add_argument("action", choices=["export"])
    sc.add_argument("runs", nargs="+", help="run folders or scaling.jsonl files")
    sc.add_argument("--csv", required=True, help="output CSV path")
    _add_fit(sub)
    sub.add_parser("keys", help="list every config key with its default and meaning")
    return p


def _load(spec: str, overrides: list[str]):
    """(config, model, tokenizer, checkpoint path, device) from a checkpoint, with config overrides."""
    from leanlm.engine.trained import load_trained

    t = load_trained(spec, overrides)
    return t.cfg, t.model, t.tokenizer, t.path, t.device


def cmd_train(args) -> int:
    from leanlm.engine.config import load_config
    from leanlm.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    res = train(cfg)
    from leanlm.engine import distributed as dist

    if dist.is_main():
        if res.interrupted:
            print(
                f"leanlm: interrupted at step {res.step}; checkpoint {res.checkpoint}; continue with train.resume=auto"
            )
            return 0
        if res.final is not None:
            print(
                f"leanlm: done: {res.step} steps, {res.tokens_seen:,} tokens in {res.wall_s:.0f}s "
                f"({res.tokens_per_s:,.0f} tokens/s)"
            )
            print(
                f"leanlm: held-out loss {res.final.loss:.4f}, perplexity {res.final.ppl:.2f} "
                f"(unigram baseline of the same tokenizer: {res.unigram_ppl:.2f}) on {res.final.tokens:,} tokens"
            )
        print(
            f"leanlm: logs {res.run_dir}/metrics.jsonl and {res.run_dir}/tb (tensorboard --logdir {res.run_dir}/tb); "
            f"checkpoint {res.checkpoint}"
        )
    return 0


def cmd_eval(args) -> int:
    from leanlm.engine.build import autocast_for
    from leanlm.engine.data import build_corpus
    from leanlm.engine.evaluate import evaluate, unigram_loss

    if args.tasks:  # an extra: said before the model is loaded
        from leanlm.engine.harness import require_lm_eval

        require_lm_eval()
    cfg, model, tok, path, device = _load(args.checkpoint, args.overrides)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    if args.tasks:
        return _eval_harness(args, cfg=cfg, model=model, tok=tok, path=path)
    corpus = build_corpus(cfg, path)
    res = evaluate(
        model,
        corpus.val_tokens,
        seq_len=cfg.train.seq_len,
        batch_size=cfg.eval.batch_size,
        device=device,
        autocast=autocast_for(cfg.train.precision, device),
        chunk_tokens=cfg.train.loss_chunk_tokens,
    )
    uni = math.exp(unigram_loss(corpus.train_counts, corpus.val_tokens, cfg.train.seq_len))
    print(
        f"{path}: held-out loss {res.loss:.4f}, perplexity {res.ppl:.2f} on {res.tokens:,} tokens "
        f"(unigram baseline perplexity {uni:.2f}; data {cfg.data.source})"
    )
    return 0


def _eval_harness(args, *, cfg, model, tok, path: Path) -> int:
    """``leanlm eval --tasks``: lm_eval on the checkpoint in memory; results into the run folder."""
    from leanlm.engine.harness import run_harness, save_harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = run_harness(
        model, cfg, tok, tasks, include_path=args.include_path, limit=args.limit, batch_size=args.batch_size
    )
    step = int(json.loads((path / "manifest.json").read_text())["step"])
    run_dir = path.parent.parent
    saved = save_harness(run_dir, step, result, tensorboard=cfg.log.tensorboard)
    print(result.table())
    print(f"leanlm: {path} (step {step}): results in {saved}, scores in {run_dir}/metrics.jsonl and tb/")
    return 0


def cmd_generate(args) -> int:
    from leanlm.engine.generate import sample

    _, model, tok, _, _ = _load(args.checkpoint, [])
    text = sample(
        model,
        tok,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(text)
    return 0


def cmd_tokenize(args) -> int:
    from leanlm.engine.data.tokenize import tokenize_source

    meta = tokenize_source(
        args.source,
        args.out_dir,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        workers=args.workers,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        hf_split=args.hf_split,
        hf_data_files=args.hf_data_files,
        unit_bytes=int(args.unit_mb * 1e6),
    )
    rate = meta["text_bytes_tokenized"] / 1e6 / max(meta["seconds"], 1e-9)
    print(
        f"leanlm: {args.out_dir}: {len(meta['shards'])} shards, {meta['tokens']['train']:,} train / "
        f"{meta['tokens']['val']:,} held-out tokens ({meta['documents']['train']:,} / {meta['documents']['val']:,} "
        f"documents), {rate:.2f} MB/s of text this run; train with data.source=tokens:{args.out_dir}"
    )
    return 0


def cmd_cooldown(args) -> int:
    from leanlm.engine.cooldown import cooldown_config
    from leanlm.engine.trainer import train

    cfg = cooldown_config(args.run, at=args.at, steps=args.steps, out=args.out, overrides=args.overrides)
    res = train(cfg)
    if res.final is not None:
        print(
            f"leanlm: cooldown {res.run_dir}: steps {args.at}..{res.step}, {res.tokens_seen:,} tokens, held-out loss "
            f"{res.final.loss:.4f} (a cooled point in {res.run_dir}/scaling.jsonl)"
        )
    return 0


def cmd_export(args) -> int:
    from leanlm.engine.hf import export_hf

    report = export_hf(args.checkpoint, args.out_dir, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1e9))
    print(f"leanlm: {report.summary()}")
    return 0


def cmd_memory(args) -> int:
    from leanlm.engine.config import load_config
    from leanlm.engine.data.tokenizer import Tokenizer
    from leanlm.engine.memory import memory_report

    cfg = load_config(args.config, args.overrides)
    if cfg.train.init_from:  # the shape comes from the model the run starts from
        from leanlm.engine.hf.init import resolve

        cfg, _ = resolve(cfg)
    vocab = cfg.model.vocab_size or (
        Tokenizer.load(cfg.data.tokenizer).vocab_size if cfg.data.tokenizer else cfg.data.vocab_size
    )
    report = memory_report(cfg, vocab, on_gpu=not args.cpu)
    backend = cfg.distributed.backend
    report = report.per_rank(backend, cfg.distributed.zero_stage, args.world)
    print(report.table(f"{args.config} (vocab {vocab}, {cfg.train.param_dtype} weights)", cfg.optim.name))
    accum = cfg.train.grad_accum_steps(args.world)
    if cfg.optim.step_in_backward and accum > 1:
        print(
            f"  note: optim.step_in_backward with {accum} micro-batches per step keeps every gradient until the "
            f"last one; set train.batch_size=train.micro_batch_size (x world) to free them one tensor at a time"
        )
    return 0


def _output_path(option: str, spec: str | None) -> None:
    """Check an output file path before any work is done: its folder exists, it is not a folder."""
    from leanlm.engine.errors import ConfigError

    if spec is None:
        return
    path = Path(spec)
    if path.is_dir():
        raise ConfigError(f"{option} {spec}: is a folder; give a file path such as {path / 'out'}")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {spec}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{option} {spec}: folder {path.parent} is not writable")


def cmd_scaling(args) -> int:
    from leanlm.engine.scaling import export_colpret_csv, load_records

    _output_path("--csv", args.csv)
    n = export_colpret_csv(load_records(args.runs), args.csv)
    print(f"wrote {n} rows to {args.csv}")
    return 0


def cmd_fit(args) -> int:
    import json

    from leanlm.engine.scaling import fit, holdout_are, load_records, plot_fit, trajectory_points

    _output_path("--json", args.json)
    _output_path("--plot", args.plot)
    rows = load_records(args.inputs)
    N, D, L, G = trajectory_points(rows, args.drop_fraction, all_points=args.all_points)
    kw = dict(method=args.method, grid=args.grid)
    if args.holdout:
        result, are, n_target = holdout_are(rows, drop_fraction=args.drop_fraction, **kw)
        print(f"held-out: the largest model's last 30% ({n_target} checkpoints), ARE {are * 100:.2f}%")
    else:
        result = fit(N, D, L, groups=G, bootstrap=args.bootstrap, **kw)
    print(result.table())
    out = result.to_dict()
    if args.budget:
        n_opt, d_opt = result.compute_optimal(args.budget)
        out["compute_optimal"] = {"flops": args.budget, "N": n_opt, "D": d_opt}
        print(
            f"compute-optimal at C={args.budget:.3g}: N={n_opt:.4g}, D={d_opt:.4g} "
            f"({d_opt / n_opt:.1f} tokens/parameter)"
        )
    if args.predict:
        loss = float(result.predict(*args.predict))
        out["prediction"] = {"N": args.predict[0], "D": args.predict[1], "loss": loss}
        print(f"predicted loss at N={args.predict[0]:.4g}, D={args.predict[1]:.4g}: {loss:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot_fit(result, N, D, L, path=args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_keys(args) -> int:
    from leanlm.engine.config import describe_keys

    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    for key, default, help_ in rows:
        print(f"{key:<{width}}  {default:<14}  {help_}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "cooldown":  # key=value overrides may follow --at/--steps
        args.overrides += extra
    elif extra:
        parser.parse_args(argv)  # the usual one-line error for what is not recognised
    from leanlm.engine.errors import LeanLMError

    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return {
            "train": cmd_train,
            "eval": cmd_eval,
            "generate": cmd_generate,
            "export": cmd_export,
            "cooldown": cmd_cooldown,
            "tokenize": cmd_tokenize,
            "memory": cmd_memory,
            "scaling": cmd_scaling,
            "fit": cmd_fit,
            "keys": cmd_keys,
        }[args.command](args)
    except LeanLMError as e:
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The console script: ``main()``, then exit with its status. Under torchrun the process
    exits without interpreter teardown once the run has finished and closed its files: a C++
    worker thread left by gloo/DTensor collectives occasionally aborts the teardown ("terminate
    called without an active exception", about 1 run in 10 on CPU), which would turn a finished
    run into a failed one."""
    code = main()
    from leanlm.engine import distributed as dist

    if dist.launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
