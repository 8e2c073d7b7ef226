"""`lminfinite lm-eval`: a thin command over the lm-evaluation-harness's `simple_evaluate`.

The model is loaded once (`lminfinite.models.load_model`) and evaluated with each `--method` as the
harness's model type "lminfinite" (`lminfinite.integrations.lm_eval`); the offline tasks shipped with the
package (`lminfinite_passkey`, `lminfinite_needle`, `lminfinite_ppl`, tag `lminfinite`) are always
available, the harness's own tasks too. Per method it prints the harness's table (`lm_eval.utils.make_table`)
and, with `--output-path`, writes the results where the harness's CLI writes them (its EvaluationTracker:
`PATH/<model>/results_<date>.json`, and `samples_<task>_<date>.jsonl` with `--log-samples`); with several
methods it ends with one table comparing them. Heavy imports happen inside `run_lm_eval` only.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..eval.errors import BadValue, MissingDependency
from . import ALL_METHODS, CliError, method_objects, new_command, nonneg_int, positive_int

DESCRIPTION = """Evaluate a model with LM-Infinite (or a baseline) on lm-evaluation-harness tasks.
Offline tasks shipped with lminfinite: lminfinite_passkey (the prompts of `lminfinite passkey`),
lminfinite_needle (a fact hidden in a real book), lminfinite_ppl (rolling perplexity of long documents);
`--tasks lminfinite` runs all three. Their sizes come from --metadata: max_seq_lengths, num_samples, seed
(passkey, needle), haystack (needle), ppl_corpus, ppl_tokens, ppl_docs (ppl). Hub tasks (RULER niah_*,
longbench_*, scrolls_*, ...) work as in the harness when their datasets can be downloaded."""

EPILOG = """examples:
  lminfinite lm-eval --model stories260K --tasks lminfinite --limit 2 \\
      --metadata '{"max_seq_lengths": [2048], "ppl_tokens": 2048}'
  lminfinite lm-eval --model smollm2 --n-local 256 --method vanilla,lminfinite,topk \\
      --tasks lminfinite_passkey,lminfinite_needle,lminfinite_ppl --limit 4 \\
      --metadata '{"max_seq_lengths": [1024], "num_samples": 4, "ppl_tokens": 2048, "ppl_docs": 2}' \\
      --output-path results/lm_eval
  lminfinite lm-eval --model smollm2 --n-local 2048 --tasks niah_single_1 \\
      --metadata '{"max_seq_lengths": [8192]}'          # needs network for the RULER data"""

HUB_TOKENIZERS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # for hub tasks that load a tokenizer by name


def add_command(sub, model_options: argparse.ArgumentParser) -> None:
    p = new_command(
        sub,
        "lm-eval",
        "run lm-evaluation-harness tasks with LM-Infinite",
        DESCRIPTION,
        EPILOG,
        [model_options],
        run_lm_eval,
    )
    g = p.add_argument_group("harness")
    g.add_argument("--tasks", required=True, help="comma-separated task names, groups or tags (e.g. lminfinite)")
    g.add_argument(
        "--method",
        type=method_objects,
        default="lminfinite",
        help=f"one or several (comma-separated) of {ALL_METHODS},topk[:K[:FROM]],memory[:K[:BS[:DTYPE[:SCOPE]]]] "
        "(default lminfinite)",
    )
    g.add_argument("--limit", type=_limit, help="documents per task (a fraction if below 1); for testing")
    g.add_argument("--num-fewshot", type=nonneg_int, help="few-shot examples per prompt")
    g.add_argument("--output-path", metavar="PATH", help="write the harness's results JSON under this folder")
    g.add_argument("--log-samples", action="store_true", help="also write every sample (needs --output-path)")
    g.add_argument("--metadata", type=_json_object, default={}, help="JSON object passed to the tasks")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR", help="more task configs (repeatable)")
    g.add_argument("--batch-size", type=positive_int, default=1, help="requests per forward (default 1)")
    g.add_argument("--gen-kwargs", help="generation settings for generate_until tasks, e.g. max_gen_toks=32")
    g.add_argument("--apply-chat-template", action="store_true", help="wrap the prompts in the chat template")
    g.add_argument("--bootstrap-iters", type=nonneg_int, default=100000, help="for standard errors (default 100000)")
    g.add_argument("--model-args", default="", help="more model args for the 'lminfinite' model type, k=v,k=v")
    g.add_argument("--verbosity", default="ERROR", help="log level of the harness (default ERROR)")
    m = p.add_argument_group("LM-Infinite settings (also: --n-global, --n-local, --chunk-size)")
    m.add_argument("--limit-distance", type=positive_int, help="distance D of the starting tokens (default n_local)")
    m.add_argument("--top-k", type=nonneg_int, help="top-k middle tokens (the lminfinite method; topk sets 5)")
    m.add_argument("--top-k-from-layer", type=nonneg_int, help="first layer with top-k tokens")
    m.add_argument("--backend", default="auto", choices=["auto", "torch", "naive", "flex"], help="attention kernel")


def _limit(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need a positive count or fraction")
    return int(value) if value >= 1 else value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--metadata is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--metadata must be a JSON object, e.g. '{\"max_seq_lengths\": [4096]}'")
    return value


def _task_manager(tasks: list[str], include: list[str], metadata: dict):
    """A TaskManager over our task configs (+ --include-path), with the harness's own tasks only if needed."""
    from lm_eval.tasks import TaskManager

    from ..integrations.lm_eval import TASKS_DIR

    for path in include:
        if not Path(path).exists():
            raise CliError(f"--include-path {path}: no such file or folder")
    paths = [TASKS_DIR, *include]
    named = [t for t in tasks if not Path(t).is_file()]
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if set(tm.match_tasks(named)) >= set(named):
        return tm
    tm = TaskManager(include_path=paths, metadata=metadata)
    unknown = [t for t in named if not tm.match_tasks([t])]
    if unknown:
        raise CliError(f"unknown task(s) {', '.join(unknown)} (see 'lm-eval ls tasks'; ours: lminfinite_*)")
    return tm


def _settings(args) -> dict:
    from lm_eval.utils import simple_parse_args_string

    extra = simple_parse_args_string(args.model_args) if args.model_args else {}
    settings = {
        "n_global": args.n_global,
        "n_local": args.n_local,
        "limit_distance": args.limit_distance,
        "top_k": args.top_k,
        "top_k_from_layer": args.top_k_from_layer,
        "backend": args.backend,
        "chunk_size": args.chunk_size,
    }
    clash = sorted(set(extra) & (set(settings) | {"pretrained", "method", "tokenizer", "batch_size"}))
    if clash:
        raise CliError(f"--model-args {', '.join(clash)}: give these with their own options")
    return {k: v for k, v in settings.items() if v is not None} | extra


def _model_args(name: str, method: str, settings: dict) -> str:
    """The model args string recorded in the results (and naming the results folder, as in the harness)."""
    shown = {k: v for k, v in settings.items() if not (k == "backend" and v == "auto")}
    return ",".join([f"pretrained={name}", f"method={method}"] + [f"{k}={v}" for k, v in shown.items()])


def run_lm_eval(args) -> int:
    try:
        import lm_eval
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.utils import make_table
    except ImportError:
        raise MissingDependency("lminfinite lm-eval needs the harness: pip install 'lminfinite[lm-eval]'") from None

    from ..api import disable
    from ..integrations.lm_eval import LMInfiniteLM
    from . import _check_methods, _setup

    if args.log_samples and not args.output_path:
        raise CliError("--log-samples needs --output-path")
    logging.getLogger("lm_eval").setLevel(args.verbosity.upper())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CliError("--tasks is empty")
    # Tasks first (unknown names fail before the model loads); the metadata is the model args + --metadata,
    # as in the harness's own CLI.
    settings = _settings(args)
    metadata = {"pretrained": args.model, "seed": args.seed} | settings | args.metadata
    if args.model in HUB_TOKENIZERS:
        metadata.setdefault("tokenizer", HUB_TOKENIZERS[args.model])
    task_manager = _task_manager(tasks, args.include_path, metadata)
    model, tokenizer, _ = _setup(args)  # seeds, loads the model, resolves --n-local
    _check_methods(args, model, args.method)
    settings["n_local"] = args.n_local
    summaries = []
    try:
        for method in (m.name for m in args.method):
            try:
                lm = LMInfiniteLM(
                    pretrained=model,
                    tokenizer=tokenizer,
                    model_name=args.model,
                    method=method,
                    batch_size=args.batch_size,
                    **settings,
                )
            except ValueError as e:  # enable() refusing a setting the user gave
                if isinstance(e, BadValue):
                    raise
                raise BadValue(f"{method}: {' '.join(str(e).split())}") from e
            model_args = _model_args(args.model, method, settings)
            tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
            results = lm_eval.simple_evaluate(
                model=lm,
                model_args=model_args,
                tasks=tasks,
                num_fewshot=args.num_fewshot,
                batch_size=args.batch_size,
                device=args.device,
                limit=args.limit,
                log_samples=args.log_samples,
                evaluation_tracker=tracker,
                apply_chat_template=args.apply_chat_template,
                gen_kwargs=args.gen_kwargs,
                task_manager=task_manager,
                bootstrap_iters=args.bootstrap_iters,
                random_seed=args.seed,
                metadata=args.metadata,
            )
            results["config"]["model"] = "lminfinite"
            samples = results.pop("samples", None)
            if tracker is not None:
                tracker.save_results_aggregated(results=results, samples=samples if args.log_samples else None)
                if args.log_samples:
                    for task_name in results["configs"]:
                        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
            print(f"lminfinite ({model_args}), limit: {args.limit}, num_fewshot: {args.num_fewshot}")
            print(make_table(results))
            if "groups" in results:
                print(make_table(results, "groups"))
            summaries.append((method, results))
    finally:
        disable(model)
    if len(summaries) > 1:
        print(comparison_table(summaries))
    if args.output_path:
        print(f"results written under {Path(args.output_path) / _folder(args.model)}")
    return 0


def _folder(name: str) -> str:
    from lm_eval.utils import sanitize_model_name

    return sanitize_model_name(name)


def comparison_table(summaries: list[tuple[str, dict]]) -> str:
    """Markdown: one row per (task, metric), one column per method."""
    methods = [m for m, _ in summaries]
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for method, results in summaries:
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                rows.setdefault((task, key.split(",")[0]), {})[method] = value
    lines = ["| task | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (task, metric), values in sorted(rows.items()):
        cells = [f"{values[m]:.4f}" if m in values else "-" for m in methods]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
