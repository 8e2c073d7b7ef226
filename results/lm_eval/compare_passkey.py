"""Reproduce results/lm_eval: one harness run on SmolLM2 and the passkey ordering check.

    OMP_NUM_THREADS=1 nice -n 10 python results/lm_eval/compare_passkey.py      # ~30 min on 2 busy CPU cores

1. `lminfinite lm-eval` on SmolLM2-135M-Instruct with a small window (n_local=256): the three offline tasks,
   methods vanilla, lminfinite, topk, samples logged -> results/lm_eval/smollm2/results_*.json, samples_*.jsonl
   (one results file per method, written by the harness's EvaluationTracker).
2. `lminfinite passkey` (our own command) on the same lengths, samples and seed, hence the same prompts
   -> results/lm_eval/passkey_command.json.
3. Accuracy by method and length from both, the two orderings of the methods, and whether they agree
   -> results/lm_eval/passkey_ordering.json; prints the markdown tables of the README section.

`--compare-only` skips the two runs and compares the files already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL, N_LOCAL, METHODS, SEED = "smollm2", 256, "vanilla,lminfinite,topk", 0
LENGTHS, SAMPLES = [1024, 2048], 4
METADATA = {"max_seq_lengths": LENGTHS, "num_samples": SAMPLES, "ppl_tokens": 2048, "ppl_docs": 2}
HARNESS = [
    "lm-eval", "--model", MODEL, "--n-local", str(N_LOCAL), "--method", METHODS, "--seed", str(SEED),
    "--tasks", "lminfinite_passkey,lminfinite_needle,lminfinite_ppl", "--metadata", json.dumps(METADATA),
    "--output-path", str(HERE), "--log-samples",
]  # fmt: skip
COMMAND = [
    "passkey", "--model", MODEL, "--n-local", str(N_LOCAL), "--methods", METHODS, "--seed", str(SEED),
    "--lengths", ",".join(map(str, LENGTHS)), "--samples", str(SAMPLES), "--out", str(HERE / "passkey_command.json"),
    "--no-progress",
]  # fmt: skip


def run(argv: list[str]) -> None:
    print("$ lminfinite " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "lminfinite.cli", *argv], check=True)


def harness_runs() -> list[dict]:
    """The latest harness results file of each method (results_*.json under HERE/smollm2)."""
    latest: dict[str, tuple[str, dict]] = {}
    for path in sorted((HERE / MODEL).glob("results_*.json")):
        data = json.loads(path.read_text())
        method = data["config"]["lminfinite"]["method"]
        latest[method] = (path.name, data)
    return [dict(data, file=name) for name, data in latest.values()]


def harness_passkey(run: dict) -> dict[int, float]:
    """Accuracy by length from the run's logged passkey samples."""
    stamp = run["file"].removeprefix("results_").removesuffix(".json")
    path = HERE / MODEL / f"samples_lminfinite_passkey_{stamp}.jsonl"
    hits = defaultdict(list)
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        hits[sample["doc"]["length"]].append(sample["acc"])
    return {length: sum(v) / len(v) for length, v in sorted(hits.items())}


def ordering(acc: dict[str, float]) -> list[list[str]]:
    """Methods from best to worst, ties grouped."""
    groups: dict[float, list[str]] = defaultdict(list)
    for method, value in acc.items():
        groups[round(value, 6)].append(method)
    return [sorted(groups[v]) for v in sorted(groups, reverse=True)]


def compare() -> dict:
    runs = {r["config"]["lminfinite"]["method"]: r for r in harness_runs()}
    command = json.loads((HERE / "passkey_command.json").read_text())
    ours = {(row["method"], row["length"]): row["accuracy"] for row in command["results"] if row["depth"] == "all"}
    methods = METHODS.split(",")
    table = []
    for method in methods:
        by_length = harness_passkey(runs[method])
        for length in LENGTHS:
            table.append(
                {"method": method, "length": length, "harness": by_length[length], "command": ours[(method, length)]}
            )
    overall = {
        source: {m: sum(r[source] for r in table if r["method"] == m) / len(LENGTHS) for m in methods}
        for source in ("harness", "command")
    }
    result = {
        "model": MODEL,
        "n_local": N_LOCAL,
        "lengths": LENGTHS,
        "samples": SAMPLES,
        "seed": SEED,
        "by_length": table,
        "overall": overall,
        "ordering": {source: ordering(acc) for source, acc in overall.items()},
        "same_accuracies": all(r["harness"] == r["command"] for r in table),
    }
    result["same_ordering"] = result["ordering"]["harness"] == result["ordering"]["command"]
    result["harness_table"] = harness_table(list(runs.values()), methods)
    (HERE / "passkey_ordering.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def harness_table(runs: list[dict], methods: list[str]) -> list[dict]:
    """Rows (task, metric, value per method) of the harness's results."""
    by_method = {r["config"]["lminfinite"]["method"]: r["results"] for r in runs}
    rows = []
    for task, metric in [
        ("lminfinite_passkey", "acc"),
        ("lminfinite_needle", "acc"),
        ("lminfinite_ppl", "token_perplexity"),
        ("lminfinite_ppl", "bits_per_byte"),
    ]:
        rows.append({"task": task, "metric": metric, **{m: by_method[m][task][f"{metric},none"] for m in methods}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-only", action="store_true")
    if not parser.parse_args().compare_only:
        run(HARNESS)
        run(COMMAND)
    result = compare()
    methods = METHODS.split(",")
    print("\n| task | metric | " + " | ".join(methods) + " |\n|---|---|" + "---|" * len(methods))
    for row in result["harness_table"]:
        print(f"| {row['task']} | {row['metric']} | " + " | ".join(f"{row[m]:.3f}" for m in methods) + " |")
    print("\n| method | length | lminfinite_passkey (harness) | lminfinite passkey (command) |\n|---|---|---|---|")
    for row in result["by_length"]:
        print(f"| {row['method']} | {row['length']} | {row['harness']:.2f} | {row['command']:.2f} |")
    print(f"\nordering: harness {result['ordering']['harness']}, command {result['ordering']['command']}")
    print(f"same accuracies: {result['same_accuracies']}, same ordering: {result['same_ordering']}")


if __name__ == "__main__":
    main()
