"""Run every benchmark and write `summary.md` (the tables quoted in the README) beside their results.

    python benchmarks/run_all.py [--quick] [--only prefill|decode|score] [--results DIR]

The default sizes are those of the README (about 12 minutes on a quiet 2-core machine) and the
results go to `benchmarks/results/`. `--quick` uses smaller sizes (a few minutes) and writes to
`benchmarks/results/quick/`, so the README's results are not overwritten. `--only NAME` reruns one
benchmark (at the quick sizes with `--quick`) and rebuilds the summary from the saved results of
the others in the same folder. `lminfinite bench` runs this script with the same options.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import decode  # noqa: E402
import prefill  # noqa: E402
import score  # noqa: E402
from common import environment  # noqa: E402

DEFAULT_RESULTS = common.RESULTS
RUNS = {"prefill": prefill.main, "decode": decode.main, "score": score.main}
QUICK = {
    "prefill": ["--n-local", "128", "--max-mult", "16", "--vanilla-max-mult", "8"],
    "decode": ["--n-local", "128", "--mults", "1,8", "--steps", "8"],
    "score": ["--tokens", "20000", "--short", "5000", "--long", "20000"],
}


def _at(rows, key, mult, method="lminfinite") -> float:
    return next((r[key] for r in rows if r["method"] == method and r["mult"] == mult), float("nan"))


def _ratio(rows, key, a, b, method="lminfinite") -> float:
    return _at(rows, key, b, method) / _at(rows, key, a, method)


def summary(pre, dec, sco) -> str:
    env = environment()
    lines = [
        f"Measured {env['date']} on {env['device']}, {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}.",
        "",
    ]
    lines += [
        "| prefill (random Llama, hidden 2048, 4 layers) | "
        + " | ".join(f"{r['mult']}L" for r in pre if r["method"] == "lminfinite")
        + " |"
    ]
    lines += ["|---" * (1 + sum(r["method"] == "lminfinite" for r in pre)) + "|"]
    for method in ("lminfinite", "vanilla"):
        by = {r["mult"]: r for r in pre if r["method"] == method}
        cells = [
            f"{by[r['mult']]['ms_per_token']:.2f} ms/tok, {by[r['mult']]['peak_rss_mb']:.0f} MB"
            if r["mult"] in by
            else "-"
            for r in pre
            if r["method"] == "lminfinite"
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| decode | " + " | ".join(f"{r['mult']}L" for r in dec if r["method"] == "lminfinite") + " |"]
    lines += ["|---" * (1 + sum(r["method"] == "lminfinite" for r in dec)) + "|"]
    for method in dict.fromkeys(r["method"] for r in dec):
        cells = [f"{r['ms_per_token']:.1f} ms/tok, cache {r['cache_mb']:.1f} MB" for r in dec if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| scoring (stories260K) | corpus | tokens | tokens/s | peak RSS | NLL by tenth of the text |",
        "|---|---|---|---|---|---|",
    ]
    for r in sco:
        segs = ", ".join(f"{x:.2f}" for x in r.get("nll_by_segment", [])) or "-"
        lines.append(
            f"| {r['kind']} | {r['corpus']} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} MB | {segs} |"
        )
    ratios = {
        "prefill time/token 8L/1L": _ratio(pre, "ms_per_token", 1, 8),
        "prefill time/token 64L/1L": _ratio(pre, "ms_per_token", 1, 64),
        "prefill peak RSS 64L/8L": _ratio(pre, "peak_rss_mb", 8, 64),
        "decode time/token 8L/1L": _ratio(dec, "ms_per_token", 1, 8),
        "decode time/token 64L/1L": _ratio(dec, "ms_per_token", 1, 64),
        "decode vanilla/lminfinite at 8L": _at(dec, "ms_per_token", 8, "vanilla") / _at(dec, "ms_per_token", 8),
    }
    if any(r["method"] == "topk" for r in dec):
        top = max(r["mult"] for r in dec if r["method"] == "topk")
        ratios[f"decode topk/lminfinite at {top}L"] = _at(dec, "ms_per_token", top, "topk") / _at(
            dec, "ms_per_token", top
        )
        ratios[f"topk cache {top}L/1L"] = _ratio(dec, "cache_mb", 1, top, "topk")
    shown = "; ".join(f"{k} = {v:.2f}" for k, v in ratios.items() if math.isfinite(v))  # sizes not run: left out
    lines += ["", "Ratios (lminfinite unless named): " + shown]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The options (`lminfinite bench` offers the same ones; a test keeps them in step)."""
    parser = argparse.ArgumentParser(
        prog="run_all.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, a few minutes (results in benchmarks/results/quick/)"
    )
    parser.add_argument(
        "--only", choices=list(RUNS), help="rerun one benchmark; the summary reuses the others' results"
    )
    parser.add_argument(
        "--results",
        metavar="DIR",
        help="folder for the JSON, plots and summary.md (default: benchmarks/results, with --quick "
        "benchmarks/results/quick)",
    )
    return parser


def main(argv=None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    folder = Path(args.results) if args.results else DEFAULT_RESULTS / "quick" if args.quick else DEFAULT_RESULTS
    common.use_results(folder)
    sizes = QUICK if args.quick else {name: [] for name in RUNS}
    if args.only:
        missing = [f"{n}.json" for n in RUNS if n != args.only and not (folder / f"{n}.json").is_file()]
        if missing:
            again = " --quick" if args.quick else ""
            parser.error(
                f"--only {args.only} rebuilds the summary from the others' saved results, and {', '.join(missing)} "
                f"are not in {folder}: run them once first (python benchmarks/run_all.py{again})"
            )
        RUNS[args.only](sizes[args.only])
        pre, dec, sco = (json.loads((folder / f"{name}.json").read_text())["results"] for name in RUNS)
    else:
        pre, dec, sco = (run(sizes[name]) for name, run in RUNS.items())
    text = summary(pre, dec, sco)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(text)
    print(text)
    print(f"results in {folder}")
    return text


if __name__ == "__main__":
    main()
