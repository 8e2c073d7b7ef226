"""Run every benchmark and write `benchmarks/results/summary.md` (the table quoted in the README).

    python benchmarks/run_all.py [--quick]

--quick uses smaller sizes (a few minutes); the default sizes are those of the README table;
--only NAME reruns one benchmark and rebuilds the summary with the saved results of the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402
import prefill  # noqa: E402
import score  # noqa: E402
from common import RESULTS, environment  # noqa: E402


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
    lines += ["", "Ratios (lminfinite unless named): " + "; ".join(f"{k} = {v:.2f}" for k, v in ratios.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["prefill", "decode", "score"], help="rerun one benchmark, reuse the others")
    args = parser.parse_args(argv)
    if args.only:
        runs = {"prefill": prefill.main, "decode": decode.main, "score": score.main}
        runs[args.only]([])
        pre, dec, sco = (json.loads((RESULTS / f"{name}.json").read_text())["results"] for name in runs)
    elif args.quick:
        pre = prefill.main(["--n-local", "128", "--max-mult", "16", "--vanilla-max-mult", "8"])
        dec = decode.main(["--n-local", "128", "--mults", "1,8", "--steps", "8"])
        sco = score.main(["--tokens", "20000", "--short", "5000", "--long", "20000"])
    else:
        pre, dec, sco = prefill.main([]), decode.main([]), score.main([])
    text = summary(pre, dec, sco)
    (RESULTS / "summary.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
