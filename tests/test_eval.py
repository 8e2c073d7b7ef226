"""The eval suite on the real stories260K model and texts: perplexity by position, passkey, generation,
text checks, model loading and plots, with small sizes."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import lminfinite
from lminfinite.eval import generation, passkey, perplexity, plots, report, texts
from lminfinite.eval.methods import applied, greedy, parse_methods, top_k_setting
from lminfinite.models import load_model
from lminfinite.models.assets import asset


@pytest.fixture(scope="module")
def tinystories():
    path = asset("corpora", "tinystories_train_head.txt")
    if not path.is_file():
        pytest.skip(f"{path} not found (set LMINFINITE_ASSETS)")
    return texts.read_text_file(path)


@pytest.fixture(scope="module")
def window(stories, tinystories):
    """One real 2048-token window (BOS + text) of TinyStories."""
    return texts.windows(stories[1], tinystories, 1, 2048)


def _exact_last_tokens_nll(model, ids: torch.Tensor, n_local: int) -> torch.Tensor:
    """Reference: each query recomputed on its own latest `n_local` tokens."""
    out = torch.empty(ids.numel() - 1)
    with torch.no_grad():
        for i in range(ids.numel() - 1):
            ctx = ids[max(0, i - n_local + 1) : i + 1]
            logits = model(input_ids=ctx[None], use_cache=False).logits[0, -1]
            out[i] = -torch.log_softmax(logits, -1)[ids[i + 1]]
    return out


# ---------------------------------------------------------------------------------------------- perplexity


def test_bucket_edges():
    assert perplexity.bucket_edges("pow2", 4095) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert perplexity.bucket_edges(512, 1100) == [0, 512, 1024, 1536]
    assert perplexity.bucket_edges([0, 512, 4096], 4095) == [0, 512, 4096]
    with pytest.raises(ValueError, match="increasing"):
        perplexity.bucket_edges([0, 512, 100], 4095)


def test_bucketize_and_merge_are_token_weighted_means():
    nll = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [1.0, 2.0, 5.0, 7.0]])
    rows = perplexity.bucketize("m", nll, [0, 1, 2, 4])
    assert [(r["bucket_start"], r["bucket_end"], r["tokens"]) for r in rows] == [(0, 1, 2), (1, 2, 2), (2, 4, 3)]
    assert rows[2]["nll"] == pytest.approx(5.0) and rows[2]["ppl"] == pytest.approx(math.exp(5.0))
    assert perplexity.merge(rows, "m", 0, 4)["nll"] == pytest.approx(21 / 7)
    assert perplexity.merge(rows, "other", 0, 4) is None


def test_a_bucket_cut_by_the_data_and_the_summary_rows_cover_exactly_what_they_name():
    """Issue 21 item 10: positions 0..1498, buckets 0,512,1024,2048: the last bucket is [1024, 1499), and the
    summary of [512, 1500) is the token-weighted mean of every position from 512 to the end, labelled
    [512, 1499) (it used to be the bucket [512, 1024) alone, under the label [512, 1500))."""
    nll = torch.linspace(1.0, 2.0, 1499, dtype=torch.float64)[None].float()
    rows = perplexity.bucketize("m", nll, [0, 512, 1024, 2048])
    assert [(r["bucket_start"], r["bucket_end"], r["tokens"]) for r in rows] == [
        (0, 512, 512),
        (512, 1024, 512),
        (1024, 1499, 475),
    ]
    summary = perplexity.merge(rows, "m", 512, 1500)
    assert (summary["bucket_start"], summary["bucket_end"], summary["tokens"]) == (512, 1499, 987)
    assert summary["nll"] == pytest.approx(float(nll[0, 512:].double().mean()), rel=1e-6)
    # a span whose edge falls inside a bucket: the row says which positions it covers
    assert perplexity.merge(rows, "m", 0, 1000)["bucket_end"] == 512
    assert perplexity.merge(rows, "m", 100, 400) is None
    table = report.nll_table(rows, spans=[(0, 512), (512, 1500)])
    assert "[1024, 1499)" in table and "[512, 1499) all" in table and "1500" not in table
    line = next(x for x in table.splitlines() if x.startswith("[512, 1499) all"))
    assert line.split()[-1] == f"{float(nll[0, 512:].double().mean()):.3f}"


@pytest.mark.slow
def test_truncate_stride_one_is_exact_and_default_stride_matches_vanilla_inside_window(stories, window):
    model = stories[0]
    ids = window[0, :200]
    exact = _exact_last_tokens_nll(model, ids, 48)
    torch.testing.assert_close(perplexity.truncate_nll(model, ids, 48, stride=1), exact, atol=1e-4, rtol=0)
    strided = perplexity.truncate_nll(model, ids, 48)
    torch.testing.assert_close(strided[:48], exact[:48], atol=1e-4, rtol=0)  # first window = full context
    vanilla = lminfinite.score(model, ids[None])[0]
    torch.testing.assert_close(strided[:48], vanilla[:48], atol=1e-4, rtol=0)
    assert strided.isfinite().all() and (strided - exact).abs().mean() < 0.3


def test_all_methods_equal_vanilla_inside_the_window(stories, window):
    model = stories[0]
    ids = window[0, :300]
    ref = perplexity.position_nll(model, ids, "vanilla", 10, 512)
    for method in ("lminfinite", "truncate", "sinks"):
        torch.testing.assert_close(perplexity.position_nll(model, ids, method, 10, 512), ref, atol=1e-4, rtol=0)
    assert not lminfinite.is_enabled(model)


@pytest.mark.slow
def test_lminfinite_keeps_nll_flat_past_the_pretraining_length(stories, window):
    model = stories[0]
    rows = perplexity.evaluate(
        model, window, parse_methods("vanilla,lminfinite,truncate,sinks"), 10, 512, progress=False
    )
    assert not lminfinite.is_enabled(model)
    nll = {(r["method"], r["bucket_start"]): r["nll"] for r in rows}
    inside = perplexity.merge(rows, "lminfinite", 0, 512)["nll"]
    assert 1.2 < inside < 1.6  # stories260K on TinyStories: about 1.40 nats/token
    assert nll["vanilla", 1024] > nll["lminfinite", 1024] + 0.15  # vanilla degrades past 2x its length
    for method in ("lminfinite", "truncate", "sinks"):
        assert abs(nll[method, 1024] - inside) < 0.1 * inside
    assert all(r["tokens"] == r["bucket_end"] - r["bucket_start"] for r in rows if r["bucket_end"] <= 2047)


# --------------------------------------------------------------------------------------------------- texts


def test_read_text_file_checks(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffline one\r\nline two\r\n".encode())
    assert texts.read_text_file(good) == "line one\nline two\n"
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, message in [
        ("missing.txt", "not found"),
        ("empty.txt", "empty"),
        ("bin.txt", "binary"),
        ("latin1.txt", "UTF-8"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            texts.read_text_file(tmp_path / name)


def test_windows_and_prefix_encoding(stories, tinystories):
    tok = stories[1]
    full = tok.encode(tinystories[:200_000], add_special_tokens=False)
    assert texts.encode_prefix(tok, tinystories, 3000)[:3000] == full[:3000]
    w = texts.windows(tok, tinystories, 3, 1000)
    assert w.shape == (3, 1000) and (w[:, 0] == tok.bos_token_id).all()
    assert w[1, 1:].tolist() == full[999:1998]
    with pytest.raises(ValueError, match=r"has \d+ tokens, too short for 4 windows of 40000"):
        texts.windows(tok, tinystories, 4, 40000, name="tinystories")


# ------------------------------------------------------------------------------------------------- methods


def test_parse_methods():
    assert parse_methods("vanilla, sinks") == ["vanilla", "sinks"]
    assert parse_methods("topk,topk:8,topk:8:2") == ["topk", "topk:8", "topk:8:2"]
    assert [top_k_setting(m) for m in ("topk", "topk:8", "topk:8:2")] == [(5, 0), (8, 0), (8, 2)]
    bad_specs = ("", "vanilla,foo", "vanilla,vanilla", "topk:0", "topk:00", "topk:x", "topk:1:2:3", "lminfinite:3")
    for bad in bad_specs + ("topk,topk:5:0", "topk:5,topk:5:0"):
        with pytest.raises(ValueError):
            parse_methods(bad)


def test_methods_are_objects():
    """Each method is one object: its name, how it switches the model, whether it runs on a LambdaCache, and
    (tested below) how it scores and generates; a list is parsed once."""
    from lminfinite.eval.methods import LMInfinite, Method, Sinks, TopK, Truncate, Vanilla, parse

    methods = parse("vanilla, lminfinite,truncate,sinks,topk:3:1")
    assert [type(m) for m in methods] == [Vanilla, LMInfinite, Truncate, Sinks, TopK]
    assert all(isinstance(m, Method) for m in methods)
    assert [m.name for m in methods] == ["vanilla", "lminfinite", "truncate", "sinks", "topk:3:1"]
    assert [m.cached for m in methods] == [False, True, False, True, True]
    assert [m.enable_kwargs(10, 512) for m in methods] == [
        None,
        {"n_global": 10, "n_local": 512},
        None,
        {"n_global": 10, "n_local": 502, "limit_distance": 511, "sink_positions": "own"},
        {"n_global": 10, "n_local": 512, "top_k": 3, "top_k_from_layer": 1},
    ]
    assert parse("topk")[0] == parse("topk:5:0")[0] and parse("topk")[0] != parse("topk:5:1")[0]
    with pytest.raises(ValueError, match="n_local > n_global"):
        methods[3].check(600, 512)


@pytest.fixture
def count_enables(monkeypatch):
    """How many times the eval methods call lminfinite.enable."""
    import lminfinite.eval.methods as methods_module

    calls = []
    real = methods_module.enable

    def counting(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(methods_module, "enable", counting)
    return calls


@pytest.mark.slow
def test_evaluations_enable_each_method_once(stories, tinystories, count_enables):
    """Once per method for a whole evaluation, not once per window or prompt."""
    model, tok = stories
    two_windows = texts.windows(tok, tinystories, 2, 520)
    perplexity.evaluate(model, two_windows, ["vanilla", "lminfinite", "sinks"], 10, 512, progress=False)
    assert [c.get("sink_positions", "zero") for c in count_enables] == ["zero", "own"]
    count_enables.clear()
    passkey.evaluate(model, tok, ["lminfinite"], [520], 2, 10, 512, answer_tokens=2, progress=False)
    assert len(count_enables) == 1
    count_enables.clear()
    ids = texts.encode_prefix(tok, tinystories, 600)
    generation.evaluate(model, tok, ids, ["topk:2"], [32, 64], 2, 10, 512, new_tokens=3, progress=False)
    assert len(count_enables) == 1 and count_enables[0]["top_k"] == 2
    assert not lminfinite.is_enabled(model)


@pytest.mark.slow
def test_every_method_generates_text_the_same_way(stories):
    """`Method.text`: one generation path per method (lminfinite.stream for the cached ones), the same greedy
    text inside the window, and seeded sampling for every method (vanilla included)."""
    from lminfinite.eval.methods import parse

    model, tok = stories
    greedy_texts, sampled = [], []
    for method in parse("vanilla,lminfinite,truncate,sinks,topk"):
        with method.applied(model, 10, 512):
            greedy_texts.append("".join(method.text(model, tok, "Once upon a time", 20, 512)))
            sampling = {"do_sample": True, "temperature": 0.9, "top_k": 40}
            sampled.append("".join(method.text(model, tok, "Once upon a time", 20, 512, sampling=sampling, seed=3)))
    assert greedy_texts[0].startswith(", there was a little girl") and len(set(greedy_texts)) == 1
    assert len(set(sampled)) == 1 and sampled[0] != greedy_texts[0]


@pytest.mark.slow
def test_topk_method_enables_top_k_and_equals_vanilla_inside_the_window(stories, window):
    model = stories[0]
    ids = window[0, :300]
    ref = perplexity.position_nll(model, ids, "vanilla", 10, 512)
    torch.testing.assert_close(perplexity.position_nll(model, ids, "topk:3:2", 10, 512), ref, atol=1e-4, rtol=0)
    with applied(model, "topk:3:2", 10, 512):
        cfg = lminfinite.config_of(model)
        assert (cfg.top_k, cfg.top_k_from_layer) == (3, 2)
    long = window[0, :1100]
    plain = perplexity.position_nll(model, long, "lminfinite", 10, 512)
    top = perplexity.position_nll(model, long, "topk", 10, 512)
    assert (top[:522] - plain[:522]).abs().max() < 1e-4  # no middle token before position G + L
    assert (top[600:] - plain[600:]).abs().max() > 1e-3


def test_applied_always_restores_the_model(stories):
    model = stories[0]
    with pytest.raises(RuntimeError):
        with applied(model, "sinks", 10, 512):
            assert lminfinite.is_enabled(model)
            raise RuntimeError("boom")
    assert not lminfinite.is_enabled(model)
    with pytest.raises(ValueError, match="n_local > n_global"):
        with applied(model, "sinks", 10, 10):
            pass


def test_greedy_methods_agree_inside_the_window(stories):
    model, tok = stories
    prompt = tok.encode("Once upon a time")
    ref = greedy(model, prompt, 30, "vanilla", 10, 512)
    assert tok.decode(ref).startswith(", there was a little girl named Lily")
    for method in ("lminfinite", "truncate", "sinks"):
        assert greedy(model, prompt, 30, method, 10, 512) == ref


# ------------------------------------------------------------------------------------------------- passkey


def test_passkey_prompt(stories):
    tok = stories[1]
    ids = passkey.make_prompt(tok, 1024, 0.5, 12345)
    text = tok.decode(ids, skip_special_tokens=True)
    assert 1024 - 40 < len(ids) <= 1024 and ids[0] == tok.bos_token_id
    assert text.count("12345") == 2 and text.endswith("What is the pass key? The pass key is")
    assert 0.4 < text.index("12345") / len(text) < 0.6
    assert passkey.make_prompt(tok, 1024, 0.0, 12345) != ids
    assert passkey.is_correct(" 1 2 3 4 5.", 12345) and not passkey.is_correct(" 12354", 12345)
    assert passkey.depth_bin(0.99, 5) == "0.8-1.0" and passkey.depth_bin(0.0, 5) == "0.0-0.2"


@pytest.mark.slow
def test_passkey_rows_and_determinism(stories):
    model, tok = stories

    def run(seed: int) -> list[dict]:
        return passkey.evaluate(model, tok, ["lminfinite", "truncate"], [600], 3, 10, 512, seed=seed, progress=False)

    rows = run(0)
    assert rows == run(0)
    for method in ("lminfinite", "truncate"):
        mine = [r for r in rows if r["method"] == method]
        assert mine[-1]["depth"] == "all" and mine[-1]["samples"] == 3
        assert sum(r["samples"] for r in mine[:-1]) == 3
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["length"] == 600 for r in mine)


# ---------------------------------------------------------------------------------------------- generation


def test_generation_rows(stories, tinystories):
    model, tok = stories
    ids = texts.encode_prefix(tok, tinystories, 2000)
    rows = generation.evaluate(model, tok, ids, ["vanilla", "lminfinite"], [64, 700], 1, 10, 512, new_tokens=20)
    assert [(r["method"], r["position"]) for r in rows] == [
        ("vanilla", 64),
        ("vanilla", 700),
        ("lminfinite", 64),
        ("lminfinite", 700),
    ]
    assert all(0 <= r["bleu"] <= 100 and 0 <= r["rougeL"] <= 1 and r["samples"] == 1 for r in rows)
    assert rows[0]["bleu"] == rows[2]["bleu"]  # inside the window both methods are the same model
    with pytest.raises(ValueError, match="the text has 2000 tokens"):
        generation.evaluate(model, tok, ids[:2000], ["vanilla"], [5000], 1, 10, 512)


def test_generation_scorers_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"pip install 'lminfinite\[eval\]'"):
        generation.scorers()


# ------------------------------------------------------------------------------------------ models, output


def test_load_model_stories_and_hf_folder(stories, tmp_path):
    model, tok = load_model("stories260K")
    assert model.config.max_position_embeddings == 512 and len(tok) == 512
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hf_model, hf_tok = load_model(str(tmp_path))
    ids = torch.tensor([tok.encode("Once upon a time")])
    assert hf_tok.encode("Once upon a time") == ids[0].tolist() and hf_tok.padding_side == "left"
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits)


def test_load_model_errors(tmp_path, monkeypatch):
    for name in ("./no/such/model", "bad name!", str(tmp_path / "missing.bin")):
        with pytest.raises(FileNotFoundError, match="unknown model"):
            load_model(name)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="not a llama2.c .bin"):
        load_model(str(tmp_path / "weights.txt"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        load_model("stories260K", dtype="int8")

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setenv("LMINFINITE_ASSETS", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="set LMINFINITE_ASSETS to a folder holding models/stories260K/"):
        load_model("stories260K")


def test_nll_plot_shows_every_method_and_a_useful_y_range():
    """Methods with the same numbers stay visible (own marker, line style, size); the first positions' high
    NLL does not stretch the y range, and the plot says so."""
    rows = []
    for method in ("vanilla", "lminfinite", "truncate", "sinks"):
        for a, b, v in ((0, 1, 9.5), (1, 2, 6.0), (2, 4, 5.0), (4, 8, 4.0), (8, 16, 3.0), (16, 512, 1.4)):
            rows.append(perplexity._row(method, a, b, 10, v))
        rows.append(perplexity._row(method, 512, 1024, 10, 5.3 if method == "vanilla" else 1.41))
    fig = plots.nll_figure(rows, "title", 512)
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() in ("vanilla", "lminfinite", "truncate", "sinks")]
    assert len(lines) == 4
    assert len({line.get_marker() for line in lines}) == 4 and len({line.get_linestyle() for line in lines}) == 4
    assert len({line.get_markersize() for line in lines}) == 4
    low, high = ax.get_ylim()
    assert low < 1.4 and 6.0 < high < 7.0  # every bucket but position 0 (9.5) is in range
    assert "off the scale: NLL up to 9.50 at position 0" in ax.get_xlabel()


def test_passkey_plot_says_when_the_model_cannot_do_the_task():
    zeros = [
        {"method": m, "length": n, "depth": "all", "accuracy": 0.0, "samples": 5}
        for m in ("vanilla", "lminfinite")
        for n in (512, 1024)
    ]
    [note] = plots.passkey_figure(zeros, "title", 512).axes[0].texts
    text = " ".join(note.get_text().split())
    assert "cannot do the passkey task" in text and "inside its pretraining length" in text
    assert "note: every method scores 0" in report.passkey_table(zeros, 512)
    some = zeros[:-1] + [{**zeros[-1], "accuracy": 0.2}]
    assert len(plots.passkey_figure(some, "title", 512).axes[0].texts) == 0
    assert "note" not in report.passkey_table(some, 512)
    without_vanilla = [r for r in zeros if r["method"] != "vanilla"]
    assert "--methods vanilla --lengths 512" in report.passkey_note(without_vanilla, 512)


@pytest.mark.slow
def test_plots_and_tables(tmp_path):
    rows = [
        perplexity._row(m, a, b, 10, v)
        for m, d in (("vanilla", 1.0), ("lminfinite", 0.0))
        for a, b, v in ((0, 512, 1.4), (512, 1024, 1.4 + d))
    ]
    table = report.nll_table(rows, spans=[(0, 512), (0, 1024)])
    assert "[512, 1024)" in table and "[0, 1024) all" in table and "[0, 512) all" not in table
    assert "2.400" in table
    for plot, data in [
        (plots.plot_nll, rows),
        (plots.plot_passkey, [{"method": "m", "length": 1024, "depth": "all", "accuracy": 0.5, "samples": 2}]),
        (plots.plot_generation, [{"method": "m", "position": 64, "bleu": 3.0, "rougeL": 0.2, "samples": 1}]),
    ]:
        path = plot(data, tmp_path / "sub" / f"{plot.__name__}.png", "title", 512)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
