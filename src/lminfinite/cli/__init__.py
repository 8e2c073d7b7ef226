"""The `lminfinite` command: ppl, passkey, generate, gen-eval, demo and bench (more in COMMAND_MODULES).

Exit codes (also in `lminfinite --help`):

- 0: done.
- 1: the run failed, not through bad input: the model's output is not finite (NaN or inf), the
  benchmarks failed or are not here, or the system refused (out of memory, disk full).
- 2: bad input, one line `lminfinite: error: ...`: a file, size, model name, method, setting or
  output path that cannot be used, or a missing optional package. Checked before the long work.
- 3: internal error (a bug in lminfinite): `lminfinite: internal error: ...`; set
  LMINFINITE_DEBUG=1 to see the traceback (it shows the traceback of any error).
- 130: interrupted (Ctrl-C); what was already printed stays.
- 141: the output pipe closed early (`| head`): stops quietly, as a tool killed by SIGPIPE would.

Warnings (a tokenizer that may not belong to the checkpoint, G >= L, ...) print as
`lminfinite: warning: ...` on stderr and do not stop the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from ..eval.errors import BadInput, BadValue, MissingDependency

PROG = "lminfinite"
# the default comparison; topk[:K[:FROM]] and memory[:K[:BS[:DTYPE[:SCOPE]]]] on request
ALL_METHODS = "vanilla,lminfinite,truncate,sinks"
DEMO_TEXT = ("corpora", "tinystories_train_head.txt")
BENCHMARKS = ("prefill", "decode", "score")  # what `benchmarks/run_all.py --only` accepts

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 130, 141
EXIT_CODES = """exit codes: 0 done; 1 the run failed (non-finite model output, benchmarks failed, out of memory);
2 bad input (one line 'lminfinite: error: ...'); 3 internal error (a bug: LMINFINITE_DEBUG=1 shows the
traceback); 130 interrupted (Ctrl-C); 141 output pipe closed early (e.g. | head)."""


class CliError(BadValue):
    """Bad command-line input (exit code 2)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default (unless it says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text.lower()
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or (isinstance(default, list) and not default)
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so that main() reports them like every other error)."""

    def error(self, message: str):
        raise CliError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------ argument types


def positive_int(text: str) -> int:
    return _int(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _int(text, 0, "an integer >= 0")


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is not {what}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def temperature_arg(text: str) -> float:
    """A finite temperature > 0 (the rule of `lminfinite.streaming.check_sampling`)."""
    from ..streaming import check_sampling

    value = _float(text)
    try:
        check_sampling(temperature=value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def top_p_arg(text: str) -> float:
    """A top-p in (0, 1] (the rule of `lminfinite.streaming.check_sampling`)."""
    from ..streaming import check_sampling

    value = _float(text)
    try:
        check_sampling(top_p=value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def int_list(text: str) -> list[int]:
    """Parse a list like "2048,4096" into positive integers."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return [positive_int(t.strip()) for t in items]


def methods_arg(text: str) -> list[str]:
    """Method names, checked ("vanilla,topk:5" -> ["vanilla", "topk:5"]); see `method_objects`."""
    return [m.name for m in method_objects(text)]


def method_objects(text: str) -> list:
    """The `lminfinite.eval.methods.Method` objects of a comma-separated list, parsed once."""
    from ..eval.methods import parse

    try:
        return parse(text)
    except BadValue as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def method_arg(text: str):
    """One `Method` object."""
    methods = method_objects(text)
    if len(methods) != 1:
        raise argparse.ArgumentTypeError(f"one method, got {text!r}")
    return methods[0]


def memory_arg(text: str):
    """The `lminfinite.BlockMemory` of `--memory [K[:BS[:DTYPE[:SCOPE]]]]` (the settings of the `memory` method)."""
    from ..eval.methods import memory_setting

    try:
        return memory_setting(f"memory:{text}" if text else "memory")
    except BadValue as e:
        raise argparse.ArgumentTypeError(str(e).replace("invalid method", "invalid --memory")) from None


def buckets_arg(text: str):
    """Parse --buckets: "pow2", a bucket width ("512") or explicit edges ("0,512,1024,4096")."""
    if text == "pow2":
        return text
    if "," not in text:
        return positive_int(text)
    edges = [nonneg_int(t.strip()) for t in text.split(",") if t.strip()]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise argparse.ArgumentTypeError(f"bucket edges must be strictly increasing, got {text!r}")
    return edges


class _Renamed(argparse.Action):
    """An option that was renamed: using it is an error that names the new option."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise CliError(self.help_text)

    def __init__(self, *args, message: str, **kwargs):
        super().__init__(*args, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.help_text = message


# -------------------------------------------------------------------------------------------------- parser


def _model_options() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("model and method")
    g.add_argument("--model", default="stories260K", help="llama2.c .bin, hub name, local folder or 'stories260K'")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model weights")
    g.add_argument("--seed", type=nonneg_int, default=0, help="random seed")
    g.add_argument("--n-global", type=nonneg_int, default=10, help="starting tokens G")
    g.add_argument("--n-local", type=positive_int, help="local window L (default: the model's pretraining length)")
    g.add_argument("--chunk-size", type=positive_int, default=4096, help="tokens per forward when prefilling")
    return p


def _output_options(
    methods: str = ALL_METHODS, out: str | None = None, plot: str | None = None
) -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument(
        "--methods",
        type=method_objects,
        default=methods,
        help=f"comma-separated, from {ALL_METHODS},topk[:K[:FROM_LAYER]],memory[:K[:BS[:DTYPE[:SCOPE]]]]",
    )
    g.add_argument("--out", default=out, help="write the results as JSON here")
    g.add_argument("--plot", default=plot, help="save a plot here (.png, .pdf, .svg, ...)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _data_options(p: argparse.ArgumentParser, several: bool, default: tuple[str, ...] | None = None) -> None:
    g = p.add_argument_group("data (a text file or a HuggingFace dataset)")
    shown = f" (default: {'/'.join(default)} in the assets folder)" if default else ""
    if several:
        g.add_argument("--data", action="append", metavar="FILE", help=f"UTF-8 text file; repeat for more{shown}")
    else:
        g.add_argument("--data", metavar="FILE", help=f"UTF-8 text file{shown}")
    g.add_argument("--dataset", metavar="NAME", help="datasets.load_dataset name or local folder (instead of --data)")
    g.add_argument("--dataset-config", metavar="CONFIG", help="dataset configuration, e.g. wikitext-2-raw-v1")
    g.add_argument("--split", default="test", help="dataset split")
    g.add_argument("--field", default="text", help="dataset text field")
    p.set_defaults(default_data=default)


def _ppl_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perplexity")
    g.add_argument("--max-length", type=positive_int, default=4096, help="tokens per window N")
    g.add_argument("--windows", type=positive_int, default=4, help="windows K per text")
    g.add_argument("--buckets", type=buckets_arg, default="pow2", help="pow2, a width, or edges a,b,c")


def _bench_options(p: argparse.ArgumentParser) -> None:
    """The options of benchmarks/run_all.py (tests check that the two agree)."""
    p.add_argument(
        "--quick", action="store_true", help="smaller sizes, a few minutes (results in benchmarks/results/quick/)"
    )
    p.add_argument(
        "--only", choices=BENCHMARKS, help="rerun one benchmark; the summary reuses the others' saved results"
    )
    p.add_argument(
        "--results",
        metavar="DIR",
        help="folder for the JSON, plots and summary.md (default: benchmarks/results, with --quick "
        "benchmarks/results/quick)",
    )


DESCRIPTIONS = {
    "ppl": """Per-position NLL of K windows of N tokens from each text (each window: BOS + the next N - 1 tokens,
consecutive from the start of the text), averaged in buckets of position. Methods: vanilla (the
unmodified model), lminfinite (G starting tokens + window L, distance cap), truncate (each token sees
only recent tokens: strided sliding windows of L, stride L/2), sinks (StreamingLLM-style attention
sinks: G starting tokens + L - G recent ones, positions assigned inside the cache).""",
    "passkey": """Passkey retrieval as in the paper's code: a 5-digit key hidden at a random depth of filler text,
asked for at the end; greedy answer; accuracy by prompt length and depth.""",
    "generate": """Generate text from a prompt, greedy unless --do-sample. lminfinite and sinks run on a bounded
cache (topk keeps every token); vanilla (growing cache) and truncate (recomputes the last L tokens)
are the baselines. Ctrl-C stops it (exit code 130) and keeps what was printed.""",
    "gen-eval": """Cut a long text at several positions, generate the next tokens greedily with each method, and
score them against the true continuation (BLEU with sacrebleu, ROUGE-L with rouge-score).""",
    "demo": """The main job: stories260K (512-token context) on TinyStories, 4 windows of 4096 tokens, G=10,
L=512; prints NLL by position for all methods and saves results/demo.json and results/demo.png.""",
    "bench": """Run the speed and memory benchmarks: benchmarks/run_all.py of a source checkout (the current
folder's or the one this package is installed from), with these options. The benchmarks are not
part of the installed package.""",
}

EXAMPLES = {
    "ppl": """examples:
  lminfinite ppl --data ../shared/assets/corpora/tinystories_train_head.txt --max-length 4096 --windows 4
  lminfinite ppl --model stories260K --data a.txt --data b.txt --max-length 32768 --windows 1 \\
      --methods vanilla,lminfinite --out nll.json --plot nll.png
  lminfinite ppl --model meta-llama/Llama-2-7b-hf --device cuda --dtype bfloat16 --dataset wikitext \\
      --dataset-config wikitext-2-raw-v1 --split test --field text --max-length 16384 --windows 2""",
    "passkey": """examples:
  lminfinite passkey --lengths 1024,2048,4096 --samples 10 --out pk.json --plot pk.png
  lminfinite passkey --model meta-llama/Llama-2-7b-hf --device cuda --lengths 8192,16384 --methods lminfinite""",
    "generate": """examples:
  lminfinite generate --prompt "Once upon a time" --max-new-tokens 2000 --stream
  lminfinite generate --prompt "Once upon a time" --do-sample --temperature 0.8 --sample-top-k 40 --top-p 0.95
  lminfinite generate --prompt-file story.txt --max-new-tokens 200 --method vanilla""",
    "gen-eval": """examples:
  lminfinite gen-eval --data ../shared/assets/corpora/tinystories_train_head.txt --positions 256,1024,4096
  lminfinite gen-eval --data book.txt --positions 2048,8192 --samples 4 --new-tokens 100 --out gen.json""",
    "demo": """examples:
  lminfinite demo                      # stories260K, 4 x 4096 tokens: table, results/demo.json, results/demo.png
  lminfinite demo --max-length 16384 --windows 2 --plot nll16k.png""",
    "bench": """examples:
  lminfinite bench                     # every benchmark at the README's sizes (about 12 minutes on 2 cores)
  lminfinite bench --quick             # smaller sizes, results in benchmarks/results/quick/
  lminfinite bench --only decode       # rerun one benchmark, rebuild the summary""",
}


# Commands that live in a module of their own in this package (added by `add_command(sub, model_options)`,
# imported only when present and only for parsing: each imports its heavy parts inside its run function).
COMMAND_MODULES = ("chat", "serve", "lm_eval")


def new_command(sub, name: str, help: str, description: str, epilog: str, parents, func) -> Parser:
    """Add subcommand `name` to `sub` with the shared formatting (help shows defaults); `func(args) -> exit
    code` runs it."""
    p = sub.add_parser(
        name, help=help, description=description, parents=parents, epilog=epilog, formatter_class=HelpFormatter
    )
    p.set_defaults(func=func)
    return p


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="LM-Infinite: evaluate and run LLMs far past their pretraining length.",
        epilog=EXIT_CODES,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # argparse shares a parent's Action objects with every child, so one command's set_defaults(model=...)
    # would change the others' defaults: each command gets its own copy of the model options.

    def command(name: str, help: str, parents, func):
        return new_command(sub, name, help, DESCRIPTIONS[name], EXAMPLES[name], parents, func)

    p = command(
        "ppl",
        "NLL by token position, per method (the paper's Figure 1)",
        [_model_options(), _output_options()],
        run_ppl,
    )
    _data_options(p, several=True)
    _ppl_options(p)

    p = command(
        "passkey", "passkey retrieval accuracy by length and depth", [_model_options(), _output_options()], run_passkey
    )
    p.add_argument("--lengths", type=int_list, default="2048,4096,8192", help="prompt lengths in tokens")
    p.add_argument("--samples", type=positive_int, default=10, help="prompts per length")
    p.add_argument("--depth-bins", type=positive_int, default=5, help="depth buckets (5: width 0.2)")
    p.add_argument("--answer-tokens", type=positive_int, default=10, help="tokens generated per answer")

    p = command("generate", "generate text (greedy by default) from a prompt", [_model_options()], run_generate)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    p.add_argument(
        "--method",
        type=method_arg,
        default="lminfinite",
        help=f"one of {ALL_METHODS},topk[:K[:FROM]],memory[:K[:BS[:DTYPE[:SCOPE]]]]",
    )
    p.add_argument("--max-new-tokens", type=nonneg_int, default=256, help="stop after this many tokens (or at EOS)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    s = p.add_argument_group("sampling (with --do-sample)")
    s.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    s.add_argument("--temperature", type=temperature_arg, help="a finite number > 0 (default: 1.0)")
    s.add_argument(
        "--sample-top-k",
        type=nonneg_int,
        help="sample among the K most likely tokens; 0 or unset: all (not LM-Infinite's top-k middle tokens, "
        "which is --method topk:K)",
    )
    s.add_argument("--top-p", type=top_p_arg, help="nucleus sampling, in (0, 1] (default: unset, all tokens)")
    s.add_argument(
        "--top-k",
        action=_Renamed,
        message="--top-k was renamed --sample-top-k (the sampling top-k); LM-Infinite's top-k middle tokens are "
        "--method topk:K[:FROM_LAYER]",
    )

    p = command(
        "gen-eval",
        "BLEU / ROUGE-L of continuations cut from a long text",
        [_model_options(), _output_options()],
        run_gen_eval,
    )
    _data_options(p, several=False)
    p.add_argument("--positions", type=int_list, default="256,1024,4096", help="cut positions in tokens")
    p.add_argument("--samples", type=positive_int, default=2, help="texts cut per position")
    p.add_argument("--new-tokens", type=positive_int, default=100, help="tokens generated and scored")

    demo_out = _output_options(out="results/demo.json", plot="results/demo.png")
    p = command(
        "demo",
        "stories260K on TinyStories: vanilla vs LM-Infinite NLL by position",
        [_model_options(), demo_out],
        run_ppl,
    )
    _data_options(p, several=True, default=DEMO_TEXT)
    _ppl_options(p)

    p = command("bench", "run the speed and memory benchmarks (from a source checkout)", [], run_bench)
    _bench_options(p)

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}").add_command(sub, _model_options())
    return parser


# ------------------------------------------------------------------------------------------------ commands


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _setup(args):
    """Seed, load the model, resolve n_local; returns (model, tokenizer, pretraining length or None).

    The model name, device and dtype are the user's: the loader's ValueError / OSError about them is
    reported as bad input."""
    import torch

    from ..config import pretraining_length
    from ..models import load_model

    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    except MissingDependency:
        raise
    except ImportError as e:
        raise MissingDependency(f"--model {args.model}: {_one_line(e)}") from e
    except (ValueError, OSError) as e:
        raise BadValue(_one_line(e)) from e
    try:
        train_len = pretraining_length(model.config)
    except ValueError as e:
        if args.n_local is None:
            raise BadValue(f"{_one_line(e)} (--n-local)") from e
        train_len = None
    if args.n_local is None:
        args.n_local = train_len
    from ..eval.checks import tokenizer_warnings

    for message in tokenizer_warnings(model, tokenizer):
        _warn(message)
    return model, tokenizer, train_len


def _progress(args) -> bool | None:
    return False if getattr(args, "no_progress", False) else None


def _texts(args, n_tokens: int) -> list[tuple[str, str]]:
    """[(name, text)] from --data files, --dataset, or the command's default asset."""
    from ..eval.texts import dataset_text, read_text_file
    from ..models.assets import require_asset

    if args.data and args.dataset:
        raise CliError("give --data or --dataset, not both")
    if args.dataset:
        text = dataset_text(args.dataset, args.split, args.field, 16 * n_tokens, args.dataset_config)
        config = f"/{args.dataset_config}" if args.dataset_config else ""
        return [(f"{args.dataset}{config}[{args.split}].{args.field}", text)]
    files = args.data if isinstance(args.data, list) else [args.data] if args.data else []
    if not files and args.default_data:
        files = [str(require_asset(*args.default_data))]  # missing: says what and how to get it
    if not files:
        raise CliError("no text given: pass --data FILE or --dataset NAME")
    return [(f, read_text_file(f)) for f in files]


def _check_outputs(args) -> None:
    """--out and --plot must be writable (and --plot an image type) before the long run."""
    from ..eval.plots import check_plot_path
    from ..eval.report import check_output_path

    if args.out:
        check_output_path(args.out, "--out")
    if args.plot:
        check_plot_path(args.plot)
    if args.out and args.plot and Path(args.out).resolve() == Path(args.plot).resolve():
        raise CliError(f"--out and --plot are the same file {args.out}")


def _payload(args, data, config: dict, results: list[dict], seconds: float) -> dict:
    common = {"seed": args.seed, "device": args.device, "dtype": args.dtype, "n_global": args.n_global}
    common.update(n_local=args.n_local, methods=[m.name for m in args.methods])
    return {"model": args.model, "data": data, "config": {**common, **config}, "results": results, "seconds": seconds}


def _finish(args, payload: dict, plot, title: str, train_len: int | None) -> None:
    from ..eval.report import write_json

    if args.out:
        _say(f"wrote {write_json(args.out, payload)}")
    if args.plot:
        _say(f"wrote {plot(payload['results'], args.plot, title, train_len)}")


def _check_lengths(args, lengths: list[int], what: str) -> None:
    if min(lengths) < args.n_local:
        raise CliError(f"{what} {min(lengths)} is below n_local {args.n_local}: nothing to test past the window")


def _check_methods(args, model, methods) -> None:
    """Fail before a long run rather than at its last method: each method's sizes, and a trial switch of the
    model to it (enable() refuses models and settings it cannot run; those are the user's choices)."""
    G, L = args.n_global, args.n_local
    for method in methods:
        method.check(G, L)
        try:
            with method.applied(model, G, L):
                pass
        except BadInput:
            raise
        except ValueError as e:
            raise BadValue(f"{method.name}: {_one_line(e)}") from e
    if G >= L and any(m.kind in ("lminfinite", "topk") for m in methods):
        _warn(
            f"--n-global {G} >= --n-local {L}: each query attends up to G + L tokens, more than its window; "
            "LM-Infinite keeps G small (the paper: G = 10, L = the pretraining length)"
        )


def _check_text(model, ids, n_local: int) -> None:
    """Warn when the model's NLL on the start of the text is implausible (see `lminfinite.eval.checks`)."""
    from ..eval.checks import text_warning

    message = text_warning(model, ids, n_local)
    if message:
        _warn(message)


def run_ppl(args) -> int:
    """ppl and demo: NLL by position, printed as a table; JSON and plot on request."""
    import torch

    from ..eval import perplexity
    from ..eval.plots import plot_nll
    from ..eval.report import nll_table
    from ..eval.texts import windows

    _check_outputs(args)
    perplexity.check_buckets(args.buckets, args.max_length - 1)
    texts = _texts(args, args.windows * args.max_length)
    model, tokenizer, train_len = _setup(args)
    _check_lengths(args, [args.max_length], "--max-length")
    _check_methods(args, model, args.methods)
    ids = torch.cat([windows(tokenizer, text, args.windows, args.max_length, name) for name, text in texts])
    _check_text(model, ids[0], args.n_local)
    names = [name for name, _ in texts]
    _say(f"{args.model}: G={args.n_global} L={args.n_local}, {len(ids)} windows of {args.max_length} tokens")
    start = time.perf_counter()
    rows = perplexity.evaluate(
        model, ids, args.methods, args.n_global, args.n_local, args.buckets, args.chunk_size, _progress(args)
    )
    seconds = time.perf_counter() - start
    # positions 0..max_length - 2 (each predicts the next token): the second summary ends where they end
    print(nll_table(rows, spans=[(0, args.n_local), (args.n_local, args.max_length - 1)]))
    config = {"max_length": args.max_length, "windows": args.windows, "buckets": args.buckets}
    payload = _payload(args, names, config, rows, seconds)
    title = f"{args.model} on {', '.join(Path(n).name for n in names)}: G={args.n_global}, L={args.n_local}"
    _finish(args, payload, plot_nll, title, train_len)
    return 0


def run_passkey(args) -> int:
    from ..eval import passkey
    from ..eval.plots import plot_passkey
    from ..eval.report import passkey_table

    _check_outputs(args)
    model, tokenizer, train_len = _setup(args)
    _check_lengths(args, args.lengths, "passkey length")
    _check_methods(args, model, args.methods)
    start = time.perf_counter()
    rows = passkey.evaluate(
        model,
        tokenizer,
        args.methods,
        args.lengths,
        args.samples,
        args.n_global,
        args.n_local,
        seed=args.seed,
        depth_bins=args.depth_bins,
        answer_tokens=args.answer_tokens,
        chunk_size=args.chunk_size,
        progress=_progress(args),
    )
    seconds = time.perf_counter() - start
    print(passkey_table(rows, train_len))
    config = {"lengths": args.lengths, "samples": args.samples, "depth_bins": args.depth_bins}
    payload = _payload(args, "passkey", config, rows, seconds)
    _finish(args, payload, plot_passkey, f"{args.model} passkey: G={args.n_global}, L={args.n_local}", train_len)
    return 0


def run_gen_eval(args) -> int:
    import torch

    from ..eval import generation
    from ..eval.plots import plot_generation
    from ..eval.report import generation_table
    from ..eval.texts import encode_prefix

    generation.scorers()  # fail early when sacrebleu / rouge-score are missing
    _check_outputs(args)
    need = args.samples * (max(args.positions) + args.new_tokens)
    [(name, text)] = _texts(args, need)
    model, tokenizer, train_len = _setup(args)
    _check_methods(args, model, args.methods)
    ids = encode_prefix(tokenizer, text, need)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    _check_text(model, torch.tensor(bos + ids[: args.n_local]), args.n_local)
    start = time.perf_counter()
    rows = generation.evaluate(
        model,
        tokenizer,
        ids,
        args.methods,
        args.positions,
        args.samples,
        args.n_global,
        args.n_local,
        new_tokens=args.new_tokens,
        chunk_size=args.chunk_size,
        progress=_progress(args),
    )
    seconds = time.perf_counter() - start
    print(generation_table(rows))
    config = {"positions": args.positions, "samples": args.samples, "new_tokens": args.new_tokens}
    payload = _payload(args, name, config, rows, seconds)
    _finish(args, payload, plot_generation, f"{args.model} continuations of {Path(name).name}", train_len)
    return 0


def run_generate(args) -> int:
    from ..eval.texts import read_text_file

    method = args.method
    prompt = read_text_file(args.prompt_file) if args.prompt_file else args.prompt
    given = [o for o, v in (("--temperature", args.temperature), ("--sample-top-k", args.sample_top_k)) if v]
    given += ["--top-p"] if args.top_p is not None else []
    if given and not args.do_sample:
        _warn(f"{', '.join(given)}: only used with --do-sample (decoding greedily)")
    sampling = {
        "do_sample": args.do_sample,
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "top_k": args.sample_top_k or None,
        "top_p": args.top_p,
    }
    model, tokenizer, _ = _setup(args)
    _check_methods(args, model, [method])
    with method.applied(model, args.n_global, args.n_local):
        pieces = method.text(
            model, tokenizer, prompt, args.max_new_tokens, args.n_local, args.chunk_size, sampling, args.seed
        )
        with contextlib.closing(pieces):  # its clean-up runs here, while the model is still switched
            _emit(pieces, args.stream)
    return 0


def _emit(pieces, live: bool) -> None:
    """Print the pieces as they come (`live`) or all at the end; on Ctrl-C what was generated stays printed."""
    done = []
    try:
        for piece in pieces:
            if live:
                print(piece, end="", flush=True)
            else:
                done.append(piece)
    except KeyboardInterrupt:
        print("".join(done), flush=True)
        raise
    print("".join(done), flush=True)


def run_bench(args) -> int:
    """benchmarks/run_all.py of a source checkout, in a subprocess, with the same options."""
    script = bench_script()
    if script is None:
        _say(
            f"{PROG}: the benchmarks are not part of the installed package: they live in the repository's "
            "benchmarks/ folder; run this from a source checkout (or: python benchmarks/run_all.py)"
        )
        return EXIT_FAILED
    argv = (["--quick"] if args.quick else []) + (["--only", args.only] if args.only else [])
    argv += ["--results", args.results] if args.results else []
    code = subprocess.call([sys.executable, str(script), *argv])
    if code == -2 or code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    if code != 0:
        _say(f"{PROG}: error: {script} failed with exit code {code}")
        return EXIT_FAILED
    return EXIT_OK


def bench_script() -> Path | None:
    """`benchmarks/run_all.py` in the current folder or in the source checkout, if there is one."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        script = root / "benchmarks" / "run_all.py"
        if script.is_file():
            return script
    return None


# ---------------------------------------------------------------------------------------------------- main


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    _say(f"{PROG}: warning: {' '.join(message.split())}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _warn(str(message))


def _failed(e: BaseException) -> bool:
    """Errors that are neither bad input nor a bug: the run could not be completed."""
    from ..streaming import NonFiniteError

    out_of_memory = type(e).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError, without importing torch
    return isinstance(e, (NonFiniteError, MemoryError, OSError)) or out_of_memory


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that Python's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring: 0, 1, 2, 3, 130, 141)."""
    debug = bool(os.environ.get("LMINFINITE_DEBUG"))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            args = build_parser().parse_args(argv)
            return args.func(args)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        except KeyboardInterrupt:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                sys.stdout.flush()
            _say(f"{PROG}: interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _quiet_stdout()
            return EXIT_BROKEN_PIPE
        except Exception as e:
            if debug:
                raise
            message = _one_line(e)
            if isinstance(e, BadInput):
                _say(f"{PROG}: error: {message}")
                return EXIT_BAD_INPUT
            if _failed(e):
                _say(f"{PROG}: error: {message}")
                return EXIT_FAILED
            _say(
                f"{PROG}: internal error: {type(e).__name__}: {message} (a bug in lminfinite; LMINFINITE_DEBUG=1 "
                "shows the traceback)"
            )
            return EXIT_INTERNAL
