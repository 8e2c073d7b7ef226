"""The `lminfinite` command: ppl, passkey, generate, gen-eval, demo and bench.

Bad input (missing, empty or binary files, unknown models or methods, impossible sizes) ends
with one line `lminfinite: error: ...` on stderr and exit code 2; set LMINFINITE_DEBUG=1 to see
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

PROG = "lminfinite"
ALL_METHODS = "vanilla,lminfinite,truncate,sinks"  # the default comparison; topk[:K[:FROM]] on request
DEMO_TEXT = ("corpora", "tinystories_train_head.txt")


class CliError(Exception):
    """Bad command-line input."""


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


def int_list(text: str) -> list[int]:
    """Parse a list like "2048,4096" into positive integers."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return [positive_int(t.strip()) for t in items]


def methods_arg(text: str) -> list[str]:
    from ..eval.methods import parse_methods

    try:
        return parse_methods(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def method_arg(text: str) -> str:
    methods = methods_arg(text)
    if len(methods) != 1:
        raise argparse.ArgumentTypeError(f"one method, got {text!r}")
    return methods[0]


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


# -------------------------------------------------------------------------------------------------- parser


def _model_options() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    g = p.add_argument_group("model and method")
    g.add_argument(
        "--model", default="stories260K", help="llama2.c .bin, hub name, local folder or 'stories260K' (default)"
    )
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    g.add_argument("--n-global", type=nonneg_int, default=10, help="starting tokens G (default 10)")
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
        type=methods_arg,
        default=methods,
        help=f"comma-separated, from {ALL_METHODS},topk[:K[:FROM_LAYER]] (default {methods})",
    )
    g.add_argument("--out", default=out, help=f"write the results as JSON here{f' (default {out})' if out else ''}")
    g.add_argument("--plot", default=plot, help=f"save a PNG plot here{f' (default {plot})' if plot else ''}")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _data_options(p: argparse.ArgumentParser, several: bool, default: tuple[str, ...] | None = None) -> None:
    g = p.add_argument_group("data (a text file or a HuggingFace dataset)")
    if several:
        g.add_argument("--data", action="append", metavar="FILE", help="UTF-8 text file; repeat for more texts")
    else:
        g.add_argument("--data", metavar="FILE", help="UTF-8 text file")
    g.add_argument("--dataset", metavar="NAME", help="datasets.load_dataset name or local folder (instead of --data)")
    g.add_argument("--dataset-config", metavar="CONFIG", help="dataset configuration, e.g. wikitext-2-raw-v1")
    g.add_argument("--split", default="test", help="dataset split (default test)")
    g.add_argument("--field", default="text", help="dataset text field (default text)")
    p.set_defaults(default_data=default)


def _ppl_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perplexity")
    g.add_argument("--max-length", type=positive_int, default=4096, help="tokens per window N (default 4096)")
    g.add_argument("--windows", type=positive_int, default=4, help="windows K per text (default 4)")
    g.add_argument("--buckets", type=buckets_arg, default="pow2", help="pow2 (default), a width, or edges a,b,c")


DESCRIPTIONS = {
    "ppl": """Per-position NLL of K windows of N tokens from each text (each window: BOS + the next N - 1 tokens,
consecutive from the start of the text), averaged in buckets of position. Methods: vanilla (the
unmodified model), lminfinite (G starting tokens + window L, distance cap), truncate (each token sees
only recent tokens: strided sliding windows of L, stride L/2), sinks (StreamingLLM-style attention
sinks: G starting tokens + L - G recent ones, positions assigned inside the cache).""",
    "passkey": """Passkey retrieval as in the paper's code: a 5-digit key hidden at a random depth of filler text,
asked for at the end; greedy answer; accuracy by prompt length and depth.""",
    "generate": """Generate text from a prompt. lminfinite and sinks stream through a bounded cache (sampling
options apply); vanilla and truncate decode greedily.""",
    "gen-eval": """Cut a long text at several positions, generate the next tokens greedily with each method, and
score them against the true continuation (BLEU with sacrebleu, ROUGE-L with rouge-score).""",
    "demo": """The main job: stories260K (512-token context) on TinyStories, 4 windows of 4096 tokens, G=10,
L=512; prints NLL by position for all methods and saves results/demo.json and results/demo.png.""",
    "bench": """Run the speed and memory benchmarks (lminfinite.bench, or benchmarks/run_all.py in a checkout).""",
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
  lminfinite generate --prompt-file story.txt --max-new-tokens 200 --method vanilla""",
    "gen-eval": """examples:
  lminfinite gen-eval --data ../shared/assets/corpora/tinystories_train_head.txt --positions 256,1024,4096
  lminfinite gen-eval --data book.txt --positions 2048,8192 --samples 4 --new-tokens 100 --out gen.json""",
    "demo": """examples:
  lminfinite demo                      # stories260K, 4 x 4096 tokens: table, results/demo.json, results/demo.png
  lminfinite demo --max-length 16384 --windows 2 --plot nll16k.png""",
    "bench": """examples:
  lminfinite bench                     # runs lminfinite.bench (or benchmarks/run_all.py) with these arguments""",
}


# Commands that live in a module of their own in this package (added by `add_command(sub, model_options)`,
# imported only when present and only for parsing: each imports its heavy parts inside its run function).
COMMAND_MODULES = ("chat", "serve", "lm_eval")


def new_command(sub, name: str, help: str, description: str, epilog: str, parents, func) -> Parser:
    """Add subcommand `name` to `sub` with the shared formatting; `func(args) -> exit code` runs it."""
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        parents=parents,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="LM-Infinite: evaluate and run LLMs far past their pretraining length.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = _model_options()

    def command(name: str, help: str, parents, func):
        return new_command(sub, name, help, DESCRIPTIONS[name], EXAMPLES[name], parents, func)

    p = command("ppl", "NLL by token position, per method (the paper's Figure 1)", [model, _output_options()], run_ppl)
    _data_options(p, several=True)
    _ppl_options(p)

    p = command("passkey", "passkey retrieval accuracy by length and depth", [model, _output_options()], run_passkey)
    p.add_argument("--lengths", type=int_list, default=[2048, 4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--samples", type=positive_int, default=10, help="prompts per length (default 10)")
    p.add_argument("--depth-bins", type=positive_int, default=5, help="depth buckets (default 5: width 0.2)")
    p.add_argument("--answer-tokens", type=positive_int, default=10, help="tokens generated per answer")

    p = command("generate", "generate text (greedy by default) from a prompt", [model], run_generate)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    p.add_argument(
        "--method",
        type=method_arg,
        default="lminfinite",
        help=f"one of {ALL_METHODS},topk[:K[:FROM]] (default lminfinite)",
    )
    p.add_argument("--max-new-tokens", type=nonneg_int, default=256)
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy (lminfinite, sinks)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=nonneg_int)
    p.add_argument("--top-p", type=float)

    p = command(
        "gen-eval", "BLEU / ROUGE-L of continuations cut from a long text", [model, _output_options()], run_gen_eval
    )
    _data_options(p, several=False)
    p.add_argument("--positions", type=int_list, default=[256, 1024, 4096], help="cut positions in tokens")
    p.add_argument("--samples", type=positive_int, default=2, help="texts cut per position (default 2)")
    p.add_argument("--new-tokens", type=positive_int, default=100, help="tokens generated and scored (default 100)")

    demo_out = _output_options(out="results/demo.json", plot="results/demo.png")
    p = command(
        "demo", "stories260K on TinyStories: vanilla vs LM-Infinite NLL by position", [model, demo_out], run_ppl
    )
    _data_options(p, several=True, default=DEMO_TEXT)
    _ppl_options(p)

    p = command("bench", "run the benchmarks and print their table", [], run_bench)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmarks")

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}").add_command(sub, model)
    return parser


# ------------------------------------------------------------------------------------------------ commands


def _setup(args):
    """Seed, load the model, resolve n_local; returns (model, tokenizer, pretraining length)."""
    import torch

    from ..config import pretraining_length
    from ..models import load_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    train_len = pretraining_length(model.config)
    if args.n_local is None:
        args.n_local = train_len
    return model, tokenizer, train_len


def _progress(args) -> bool | None:
    return False if getattr(args, "no_progress", False) else None


def _texts(args, n_tokens: int) -> list[tuple[str, str]]:
    """[(name, text)] from --data files, --dataset, or the command's default asset."""
    from ..eval.texts import dataset_text, read_text_file
    from ..models.assets import asset

    if args.data and args.dataset:
        raise CliError("give --data or --dataset, not both")
    if args.dataset:
        text = dataset_text(args.dataset, args.split, args.field, 16 * n_tokens, args.dataset_config)
        config = f"/{args.dataset_config}" if args.dataset_config else ""
        return [(f"{args.dataset}{config}[{args.split}].{args.field}", text)]
    files = args.data if isinstance(args.data, list) else [args.data] if args.data else []
    if not files and args.default_data:
        files = [str(asset(*args.default_data))]
    if not files:
        raise CliError("no text given: pass --data FILE or --dataset NAME")
    return [(f, read_text_file(f)) for f in files]


def _payload(args, data, config: dict, results: list[dict], seconds: float) -> dict:
    common = {"seed": args.seed, "device": args.device, "dtype": args.dtype, "n_global": args.n_global}
    common.update(n_local=args.n_local, methods=args.methods)
    return {"model": args.model, "data": data, "config": {**common, **config}, "results": results, "seconds": seconds}


def _finish(args, payload: dict, plot, title: str, train_len: int) -> None:
    from ..eval.report import write_json

    if args.out:
        _say(f"wrote {write_json(args.out, payload)}")
    if args.plot:
        _say(f"wrote {plot(payload['results'], args.plot, title, train_len)}")


def _check_lengths(args, lengths: list[int], what: str) -> None:
    if min(lengths) < args.n_local:
        raise CliError(f"{what} {min(lengths)} is below n_local {args.n_local}: nothing to test past the window")


def _check_methods(args) -> None:
    """Fail before a long run rather than at its last method."""
    from ..eval.methods import check_window

    for method in args.methods:
        check_window(method, args.n_global, args.n_local)


def run_ppl(args) -> int:
    """ppl and demo: NLL by position, printed as a table; JSON and plot on request."""
    import torch

    from ..eval import perplexity
    from ..eval.plots import plot_nll
    from ..eval.report import nll_table
    from ..eval.texts import windows

    texts = _texts(args, args.windows * args.max_length)
    model, tokenizer, train_len = _setup(args)
    _check_lengths(args, [args.max_length], "--max-length")
    _check_methods(args)
    ids = torch.cat([windows(tokenizer, text, args.windows, args.max_length, name) for name, text in texts])
    names = [name for name, _ in texts]
    _say(f"{args.model}: G={args.n_global} L={args.n_local}, {len(ids)} windows of {args.max_length} tokens")
    start = time.perf_counter()
    rows = perplexity.evaluate(
        model, ids, args.methods, args.n_global, args.n_local, args.buckets, args.chunk_size, _progress(args)
    )
    seconds = time.perf_counter() - start
    print(nll_table(rows, spans=[(0, args.n_local), (args.n_local, args.max_length)]))
    config = {"max_length": args.max_length, "windows": args.windows, "buckets": args.buckets}
    payload = _payload(args, names, config, rows, seconds)
    title = f"{args.model} on {', '.join(Path(n).name for n in names)}: G={args.n_global}, L={args.n_local}"
    _finish(args, payload, plot_nll, title, train_len)
    return 0


def run_passkey(args) -> int:
    from ..eval import passkey
    from ..eval.plots import plot_passkey
    from ..eval.report import passkey_table

    model, tokenizer, train_len = _setup(args)
    _check_lengths(args, args.lengths, "passkey length")
    _check_methods(args)
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
    print(passkey_table(rows))
    config = {"lengths": args.lengths, "samples": args.samples, "depth_bins": args.depth_bins}
    payload = _payload(args, "passkey", config, rows, seconds)
    _finish(args, payload, plot_passkey, f"{args.model} passkey: G={args.n_global}, L={args.n_local}", train_len)
    return 0


def run_gen_eval(args) -> int:
    from ..eval import generation
    from ..eval.plots import plot_generation
    from ..eval.report import generation_table
    from ..eval.texts import encode_prefix

    generation.scorers()  # fail early when sacrebleu / rouge-score are missing
    need = args.samples * (max(args.positions) + args.new_tokens)
    [(name, text)] = _texts(args, need)
    model, tokenizer, train_len = _setup(args)
    _check_methods(args)
    ids = encode_prefix(tokenizer, text, need)
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
    from ..eval.methods import CACHED, applied, base, check_window, greedy
    from ..eval.texts import read_text_file
    from ..streaming import stream

    prompt = read_text_file(args.prompt_file) if args.prompt_file else args.prompt
    method = args.method
    if args.do_sample and base(method) not in CACHED:
        raise CliError("--do-sample works with --method lminfinite, sinks or topk")
    model, tokenizer, _ = _setup(args)
    check_window(method, args.n_global, args.n_local)
    if base(method) in CACHED:
        with applied(model, method, args.n_global, args.n_local):
            pieces = stream(
                model,
                tokenizer,
                prompt,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.do_sample,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                chunk_size=args.chunk_size,
            )
            _emit(pieces, args.stream)
    else:
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.bos_token_id]
        new = greedy(model, ids, args.max_new_tokens, method, args.n_global, args.n_local, args.chunk_size)
        _emit([tokenizer.decode(new, skip_special_tokens=True)], args.stream)
    return 0


def _emit(pieces, live: bool) -> None:
    if live:
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    else:
        print("".join(pieces))


def run_bench(args) -> int:
    """Thin wrapper: `lminfinite.bench.main(argv)` if installed, else `benchmarks/run_all.py` if present."""
    if importlib.util.find_spec("lminfinite.bench") is not None:
        from .. import bench

        return int(bench.main(args.args) or 0)
    script = bench_script()
    if script is not None:
        return subprocess.call([sys.executable, str(script), *args.args])
    _say(f"{PROG}: no benchmarks here: they live in the repository's benchmarks/ folder (benchmarks/run_all.py)")
    return 1


def bench_script() -> Path | None:
    """`benchmarks/run_all.py` in the current folder or in the source checkout, if there is one."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        script = root / "benchmarks" / "run_all.py"
        if script.is_file():
            return script
    return None


# ---------------------------------------------------------------------------------------------------- main


def _say(message: str) -> None:
    print(message, file=sys.stderr)


BAD_INPUT = (CliError, ValueError, TypeError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad input, 1 other failure)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted")
        return 130
    except Exception as e:
        if os.environ.get("LMINFINITE_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, BAD_INPUT):
            message = f"{type(e).__name__}: {message} (LMINFINITE_DEBUG=1 shows the traceback)"
        _say(f"{PROG}: error: {message}")
        return 2 if isinstance(e, BAD_INPUT) else 1
