"""The `lminfinite` command on stories260K and the shared texts, small sizes: JSON values, determinism,
plots, and one-line errors (exit code 2, no traceback) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lminfinite import cli
from lminfinite.models.assets import asset

CORPORA = asset("corpora")
TINY = str(CORPORA / "tinystories_train_head.txt")
ALICE = str(CORPORA / "alice_pg11.txt")


@pytest.fixture(autouse=True)
def _assets(stories_path):
    """Every test here needs stories260K (the conftest fixture skips when the assets are absent)."""
    if not CORPORA.is_dir():
        pytest.skip(f"{CORPORA} not found (set LMINFINITE_ASSETS)")


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def read(path) -> dict:
    return json.loads(path.read_text())


def nll(rows, method, start):
    [row] = [r for r in rows if r["method"] == method and r["bucket_start"] == start]
    return row["nll"]


def test_demo_writes_table_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "demo.json", tmp_path / "demo.png"
    assert run("demo", "--max-length", 2048, "--windows", 1, "--out", out, "--plot", plot, "--no-progress") == 0
    table = capsys.readouterr().out
    # positions 0..2046: the last power-of-two bucket ends where they do
    assert "[1024, 2047)" in table and "[0, 512) all" in table and "[512, 2047) all" in table
    data = read(out)
    assert data["model"] == "stories260K" and data["data"] == [TINY]
    assert data["config"]["n_global"] == 10 and data["config"]["n_local"] == 512
    rows = data["results"]
    assert set(rows[0]) == {"method", "bucket_start", "bucket_end", "tokens", "nll", "ppl"}
    assert [r["bucket_end"] for r in rows if r["method"] == "sinks"][-3:] == [512, 1024, 2047]
    assert nll(rows, "lminfinite", 1024) < nll(rows, "vanilla", 1024) - 0.15
    inside = sum(r["nll"] * r["tokens"] for r in rows if r["method"] == "lminfinite" and r["bucket_end"] <= 512) / 511
    assert abs(nll(rows, "lminfinite", 1024) - inside) < 0.1 * inside
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_ppl_two_texts_fixed_buckets_is_deterministic(tmp_path):
    args = ["ppl", "--data", TINY, "--data", ALICE, "--max-length", 1024, "--windows", 1, "--buckets", 512]
    args += ["--methods", "vanilla,lminfinite", "--no-progress"]
    assert run(*args, "--out", tmp_path / "a.json") == 0
    assert run(*args, "--out", tmp_path / "b.json", "--seed", 1) == 0
    a, b = read(tmp_path / "a.json"), read(tmp_path / "b.json")
    assert a["results"] == b["results"] and a["data"] == [TINY, ALICE]
    assert [(r["method"], r["bucket_start"], r["tokens"]) for r in a["results"]] == [
        ("vanilla", 0, 1024),
        ("vanilla", 512, 1022),
        ("lminfinite", 0, 1024),
        ("lminfinite", 512, 1022),
    ]
    assert nll(a["results"], "vanilla", 0) == pytest.approx(nll(a["results"], "lminfinite", 0), abs=1e-4)
    assert all(r["ppl"] == pytest.approx(2.718281828 ** r["nll"]) for r in a["results"])


def test_ppl_summary_rows_count_up_to_the_end_of_the_data(tmp_path, capsys):
    """Issue 21 item 10 through the command: --max-length 600 with buckets 0,256,512,1024: the last bucket is
    [512, 599), and the summary past n_local covers [256, 599) with the token-weighted mean of both buckets."""
    out = tmp_path / "r.json"
    args = ["--max-length", 600, "--windows", 1, "--buckets", "0,256,512,1024", "--n-local", 256]
    assert run("ppl", "--data", TINY, *args, "--methods", "vanilla", "--no-progress", "--out", out) == 0
    table = capsys.readouterr().out
    rows = read(out)["results"]
    assert [(r["bucket_start"], r["bucket_end"], r["tokens"]) for r in rows] == [(0, 256, 256), (256, 512, 256),
                                                                                  (512, 599, 87)]  # fmt: skip
    mean = (rows[1]["nll"] * 256 + rows[2]["nll"] * 87) / (256 + 87)
    line = next(x for x in table.splitlines() if x.startswith("[256, 599) all"))
    assert line.split()[-1] == f"{mean:.3f}"
    assert "1024" not in table and "600" not in table


@pytest.mark.slow
def test_passkey_rows_in_range_and_seeded(tmp_path, capsys):
    args = ["passkey", "--lengths", "600,800", "--samples", 2, "--methods", "lminfinite,sinks", "--no-progress"]
    assert run(*args, "--out", tmp_path / "a.json", "--plot", tmp_path / "pk.png") == 0
    assert "passkey accuracy" in capsys.readouterr().out
    assert run(*args, "--out", tmp_path / "b.json") == 0
    a = read(tmp_path / "a.json")
    assert a["results"] == read(tmp_path / "b.json")["results"]
    for method in ("lminfinite", "sinks"):
        for length in (600, 800):
            mine = [r for r in a["results"] if r["method"] == method and r["length"] == length]
            assert mine[-1]["depth"] == "all" and mine[-1]["samples"] == 2
            assert sum(r["samples"] for r in mine[:-1]) == 2
    assert all(0 <= r["accuracy"] <= 1 for r in a["results"])
    assert (tmp_path / "pk.png").is_file()


@pytest.mark.slow
def test_gen_eval_scores_in_range(tmp_path):
    out = tmp_path / "gen.json"
    args = ["gen-eval", "--data", TINY, "--positions", "100,600", "--samples", 1, "--new-tokens", 16]
    assert run(*args, "--methods", "vanilla,truncate", "--out", out, "--no-progress") == 0
    rows = read(out)["results"]
    assert [(r["method"], r["position"]) for r in rows] == [
        ("vanilla", 100),
        ("vanilla", 600),
        ("truncate", 100),
        ("truncate", 600),
    ]
    assert all(0 <= r["bleu"] <= 100 and 0 <= r["rougeL"] <= 1 and r["samples"] == 1 for r in rows)
    assert rows[0]["bleu"] == rows[2]["bleu"] and rows[0]["rougeL"] > 0


def test_generate_stream_equals_batch_and_vanilla_inside_window(capsys, tmp_path):
    outputs = []
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    for extra in (["--stream"], [], ["--method", "vanilla"], ["--method", "truncate", "--prompt-file", prompt]):
        source = [] if "--prompt-file" in extra else ["--prompt", "Once upon a time"]
        assert run("generate", *source, "--max-new-tokens", 25, *extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith(", there was a little girl named Lily")
    assert len(set(outputs)) == 1


def test_ppl_reads_a_local_dataset_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "stories"
    folder.mkdir()
    stories = [p for p in open(TINY, encoding="utf-8").read().split("\n\n") if p.strip()][:200]
    (folder / "test.jsonl").write_text("".join(json.dumps({"story": p}) + "\n" for p in stories))
    out = tmp_path / "ds.json"
    args = ["ppl", "--dataset", folder, "--field", "story", "--max-length", 1024, "--windows", 1, "--buckets", 512]
    assert run(*args, "--methods", "lminfinite", "--out", out, "--no-progress") == 0
    data = read(out)
    assert data["data"] == [f"{folder}[test].story"]
    assert 1.0 < data["results"][1]["nll"] < 2.0


def test_gen_eval_without_scorers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    assert run("gen-eval", "--data", TINY) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lminfinite[eval]'" in err


def test_help_has_examples(capsys):
    for command in ("ppl", "passkey", "generate", "gen-eval", "demo", "bench"):
        assert run(command, "--help") == 0
        assert "examples:" in capsys.readouterr().out


def _options(parser) -> dict:
    """{option string: its action} of a parser's optional arguments."""
    return {o: a for a in parser._actions for o in a.option_strings}


def _subparsers(parser) -> dict:
    [sub] = [a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)]
    return sub.choices


def test_every_help_shows_the_defaults(capsys):
    """Every command's --help (the other modules' commands too) ends each option's help with its default."""
    commands = _subparsers(cli.build_parser())
    assert {"ppl", "passkey", "generate", "gen-eval", "demo", "bench"} <= set(commands)
    for name, parser in commands.items():
        assert parser.formatter_class is cli.HelpFormatter, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default is None or default is False or default in ("==SUPPRESS==", []):
                continue
            assert action.help and "default" in formatter._get_help_string(action).lower(), (name, action.dest)
    assert run("ppl", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 4096)", "(default: 10)", "(default: stories260K)", "(default: pow2)", "(default: 0)"):
        assert shown in text
    assert "(default: vanilla,lminfinite,truncate,sinks)" in text and "examples:" in text


def test_each_command_has_its_own_defaults():
    """One command's set_defaults(model=...) must not change another's (argparse shares parents' actions)."""
    parser = cli.build_parser()
    commands = _subparsers(parser)
    commands["ppl"].set_defaults(model="other")
    assert parser.parse_args(["generate", "--prompt", "x"]).model == "stories260K"
    assert parser.parse_args(["ppl"]).model == "other"


def test_bench_help_lists_the_benchmark_options(capsys):
    assert run("bench", "--help") == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--only {prefill,decode,score}" in out and "--results DIR" in out


def _run_all():
    """benchmarks/run_all.py as a module."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("run_all_under_test", script)
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)  # it puts benchmarks/ on sys.path for its own modules
    finally:
        sys.path[:] = path
    return module


def test_bench_offers_exactly_run_all_options():
    run_all = _run_all()
    mine = _options(_subparsers(cli.build_parser())["bench"])
    theirs = _options(run_all.build_parser())
    assert set(mine) == set(theirs)
    assert mine["--only"].choices == tuple(theirs["--only"].choices) == cli.BENCHMARKS


@pytest.mark.parametrize(
    "argv", [["--quick"], ["--only", "decode"], ["--quick", "--only", "score", "--results", "r"], []]
)
def test_bench_runs_run_all_with_the_options(argv, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda args: calls.append(args) or 0)
    assert run("bench", *argv) == 0
    [(python, script, *passed)] = calls
    assert python == sys.executable and script.endswith("benchmarks/run_all.py") and passed == argv
    monkeypatch.setattr(cli.subprocess, "call", lambda args: 1)
    assert run("bench", *argv) == 1


def test_bench_has_no_phantom_module():
    """The CLI no longer refers to a `lminfinite.bench` module that does not exist."""
    import inspect

    assert "lminfinite.bench" not in inspect.getsource(cli) and "from .. import bench" not in inspect.getsource(cli)


def test_run_all_quick_and_only(monkeypatch, tmp_path, capsys):
    """--quick: small sizes into results/quick; --only NAME: that one rerun, the others' saved results reused;
    --only without the others' results: a clear error before anything runs."""
    run_all = _run_all()
    seen = []

    def fake(name, rows):
        def main(argv):
            seen.append((name, argv, run_all.common.RESULTS))
            run_all.common.save(name, {}, rows)
            return rows

        return main

    pre = [
        {"method": m, "mult": k, "ms_per_token": 2.0 * k, "peak_rss_mb": 100.0}
        for m in ("lminfinite", "vanilla")
        for k in (1, 8)
    ]
    dec = [
        {"method": m, "mult": k, "ms_per_token": 50.0 + k, "cache_mb": 4.0}
        for m in ("lminfinite", "vanilla")
        for k in (1, 8)
    ]
    sco = [{"kind": "lminfinite_score", "corpus": "c.txt", "tokens": 10, "tokens_per_s": 99.0, "peak_rss_mb": 1.0}]
    monkeypatch.setattr(
        run_all, "RUNS", {"prefill": fake("prefill", pre), "decode": fake("decode", dec), "score": fake("score", sco)}
    )
    monkeypatch.setattr(run_all, "DEFAULT_RESULTS", tmp_path)
    monkeypatch.setattr(run_all.common, "RESULTS", run_all.common.RESULTS)  # restored after the test
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--only", "decode"])
    assert "are not in" in capsys.readouterr().err and not seen
    text = run_all.main(["--quick"])
    assert seen == [(n, run_all.QUICK[n], tmp_path / "quick") for n in ("prefill", "decode", "score")]
    assert (tmp_path / "quick" / "summary.md").read_text() == text and "decode time/token 8L/1L = 1.14" in text
    assert "64L" not in text  # ratios of sizes that were not run are left out, not shown as nan
    seen.clear()
    run_all.main(["--quick", "--only", "score"])
    assert seen == [("score", run_all.QUICK["score"], tmp_path / "quick")]
    assert not (tmp_path / "summary.md").exists()


def test_bench_without_benchmarks(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(cli, "bench_script", lambda: None)
    assert run("bench") == 1
    assert "benchmarks/" in capsys.readouterr().err


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    return tmp_path


BAD = {
    "missing file": (["ppl", "--data", "{d}/missing.txt"], "not found"),
    "empty file": (["ppl", "--data", "{d}/empty.txt"], "empty"),
    "binary file": (["ppl", "--data", "{d}/binary.txt"], "binary"),
    "unknown model": (["ppl", "--model", "{d}/no-such-model", "--data", TINY], "unknown model"),
    "bad method": (["ppl", "--data", TINY, "--methods", "vanilla,magic"], "invalid method(s) magic"),
    "bad topk": (["ppl", "--data", TINY, "--methods", "topk:0"], "topk:K or topk:K:FROM_LAYER"),
    "topk past the last layer": (["generate", "--prompt", "x", "--method", "topk:3:9"], "no layer would use top-k"),
    "two methods to generate": (["generate", "--prompt", "x", "--method", "vanilla,topk"], "one method"),
    "max-length below n_local": (["ppl", "--data", TINY, "--max-length", "300"], "below n_local 512"),
    "passkey length below n_local": (["passkey", "--lengths", "256,1024"], "below n_local 512"),
    "negative number": (["ppl", "--data", TINY, "--windows", "-2"], "not a positive integer"),
    "text too short": (["ppl", "--data", ALICE, "--windows", "50"], "has 82"),
    "no data": (["ppl"], "--data FILE"),
    "data and dataset": (["ppl", "--data", TINY, "--dataset", "x"], "not both"),
    "bad buckets": (["ppl", "--data", TINY, "--buckets", "0,512,256"], "strictly increasing"),
    "sinks window": (["ppl", "--data", TINY, "--methods", "sinks", "--n-global", "600"], "n_local > n_global"),
    "no command": ([], "required"),
    "unknown option": (["ppl", "--bogus"], "unrecognized arguments"),
    "missing prompt file": (["generate", "--prompt-file", "{d}/missing.txt"], "not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, bad_files, capsys):
    argv, message = BAD[case]
    assert run(*(a.format(d=bad_files) for a in argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lminfinite: error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_debug_env_reraises(monkeypatch):
    monkeypatch.setenv("LMINFINITE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run("ppl", "--data", "/no/such/file.txt")


def _module(*argv, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lminfinite.cli", *argv], capture_output=True, text=True, env=env)


@pytest.mark.slow  # three subprocesses, each importing torch and transformers (40 s on a busy 2-core machine)
def test_subprocess_generate_and_errors(tmp_path):
    ok = _module("generate", "--prompt", "Once upon a time", "--max-new-tokens", "12")
    assert ok.returncode == 0 and ok.stdout.startswith(", there was a little girl")
    bad = _module("ppl", "--data", str(tmp_path / "missing.txt"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    offline = _module("ppl", "--data", TINY, env={"LMINFINITE_ASSETS": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert "set LMINFINITE_ASSETS to a folder holding models/stories260K/" in offline.stderr
