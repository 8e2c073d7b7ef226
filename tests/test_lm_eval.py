"""The lm-eval integration: the "lminfinite" model type against the harness's own "hf" model and against
lminfinite's own scoring and generation, the offline tasks, and the `lminfinite lm-eval` command.

Everything goes through `lm_eval.simple_evaluate`; stories260K (512-token context) is passed in memory.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

import lminfinite  # noqa: E402
from lminfinite.cache import LambdaCache  # noqa: E402
from lminfinite.eval import methods as eval_methods  # noqa: E402
from lminfinite.eval import passkey  # noqa: E402
from lminfinite.eval.errors import BadValue  # noqa: E402
from lminfinite.models.assets import asset, read_text  # noqa: E402

lmi = pytest.importorskip("lminfinite.integrations.lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lminfinite.integrations.lm_eval import LMInfiniteLM  # noqa: E402
from lminfinite.integrations.lm_eval import tasks as lmi_tasks  # noqa: E402


@pytest.fixture
def stories_lm(stories):
    """stories260K (model, tokenizer); the model is back to unmodified after the test."""
    model, tokenizer = stories
    yield model, tokenizer
    lminfinite.disable(model)


@pytest.fixture(scope="module")
def manager():
    return TaskManager(include_path=lmi.TASKS_DIR, include_defaults=False)


def evaluate(lm, tasks, manager=None, metadata=None, limit=None):
    """simple_evaluate with samples; returns {task: [resps of each doc]} and the results dict."""
    tm = (
        manager
        if metadata is None
        else TaskManager(include_path=lmi.TASKS_DIR, include_defaults=False, metadata=metadata)
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=tm, log_samples=True, bootstrap_iters=0, limit=limit
    )
    resps = {t: [[r[0] for r in s["resps"]] for s in samples] for t, samples in results["samples"].items()}
    return resps, results


def tinystories_ids(tokenizer, n: int) -> list[int]:
    text = read_text(asset("corpora", "tinystories_train_head.txt"))
    return tokenizer.encode(text[: 8 * n], add_special_tokens=False)[:n]


def multiple_choice_task(tokenizer, spans):
    """A multiple-choice task on TinyStories: context = `n` tokens from `start`, three continuations."""
    ids = tinystories_ids(tokenizer, max(s + n for s, n in spans) + 16)

    def docs(**_):
        rows = []
        for start, n in spans:
            choices = [" " + tokenizer.decode(ids[start + n : start + n + k]).strip() for k in (3, 5, 8)]
            rows.append({"context": tokenizer.decode(ids[start : start + n]), "choices": choices, "gold": 0})
        return {"test": datasets.Dataset.from_list(rows)}

    return {
        "task": "lminfinite_test_mc",
        "dataset_path": "",
        "custom_dataset": docs,
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def loglikelihoods(resps) -> torch.Tensor:
    return torch.tensor([[float(r[0]) for r in doc] for doc in resps], dtype=torch.float64)


# ------------------------------------------------------------------------------------- model type, args


def test_importing_registers_the_model_type():
    from lm_eval.api.registry import get_model

    assert get_model("lminfinite") is LMInfiniteLM
    assert issubclass(LMInfiniteLM, HFLM)


def test_model_args_are_checked(stories_lm):
    model, tok = stories_lm
    with pytest.raises(BadValue, match="invalid method"):
        LMInfiniteLM(pretrained=model, tokenizer=tok, method="best")
    with pytest.raises(BadValue, match="does not take top_k=5"):
        LMInfiniteLM(pretrained=model, tokenizer=tok, method="vanilla", top_k=5)
    with pytest.raises(BadValue, match="already sets top_k=8"):
        LMInfiniteLM(pretrained=model, tokenizer=tok, method="topk:8", top_k=5)
    with pytest.raises(BadValue, match="batch_size=auto"):
        LMInfiniteLM(pretrained=model, tokenizer=tok, batch_size="auto")
    with pytest.raises(BadValue, match="n_local"):
        LMInfiniteLM(pretrained=model, tokenizer=tok, n_local=0)
    with pytest.raises(BadValue, match="backend"):
        LMInfiniteLM(pretrained=model, tokenizer=tok, backend="fast")
    with pytest.raises(BadValue, match="tokenizer="):
        LMInfiniteLM(pretrained=model)


def test_settings_reach_enable(stories_lm):
    model, tok = stories_lm
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok, method="topk:3:2", n_local=128, limit_distance=100)
    cfg = model._lminfinite.config
    assert (cfg.n_global, cfg.n_local, cfg.limit_distance, cfg.top_k, cfg.top_k_from_layer) == (10, 128, 100, 3, 2)
    assert lm.get_model_info()["lminfinite"]["top_k"] == 3
    LMInfiniteLM(pretrained=model, tokenizer=tok, method="lminfinite", top_k=4, top_k_from_layer=1, n_local=64)
    assert (model._lminfinite.config.top_k, model._lminfinite.config.top_k_from_layer) == (4, 1)
    LMInfiniteLM(pretrained=model, tokenizer=tok, method="vanilla")
    assert not lminfinite.is_enabled(model)
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok)
    assert model._lminfinite.config.n_local == 512 == lm.n_local  # the pretraining length
    assert lm.max_length > 10**12  # the harness never left-truncates


def test_model_args_string_loads_the_model_by_name(stories_path):
    """As `simple_evaluate(model="lminfinite", model_args=...)` builds it: `pretrained` through load_model."""
    lm = LMInfiniteLM.create_from_arg_string(f"pretrained={stories_path},n_local=128,method=sinks,chunk_size=64")
    assert lm.settings == {"method": "sinks", "n_global": 10, "n_local": 128} and lm.chunk_size == 64
    assert lminfinite.is_enabled(lm.model) and lm.model._lminfinite.config.sink_positions == "own"
    assert lmi.live_tokenizer(str(stories_path)) is lm.tokenizer and lm.get_model_info()["model_sha"] == ""


# -------------------------------------------------------------------- loglikelihood: equal to the harness's


def test_loglikelihoods_equal_the_hf_model_within_n_local(stories_lm, manager):
    """Contexts <= n_local: the lminfinite model's loglikelihoods are the harness's own HF model's, both through
    HFLM's batched path (whole input in one forward) and through the cache (chunk_size=64 forces prefill)."""
    model, tok = stories_lm
    task = multiple_choice_task(tok, [(0, 30), (100, 200), (400, 440), (1000, 120)])
    hf, _ = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=2), [task], manager)
    ours, _ = evaluate(LMInfiniteLM(pretrained=model, tokenizer=tok, batch_size=2), [task], manager)
    chunked, _ = evaluate(LMInfiniteLM(pretrained=model, tokenizer=tok, chunk_size=64), [task], manager)
    reference = loglikelihoods(hf[task["task"]])
    assert reference.shape == (4, 3) and (reference < 0).all()
    torch.testing.assert_close(loglikelihoods(ours[task["task"]]), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(loglikelihoods(chunked[task["task"]]), reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_every_method_equals_the_hf_model_within_n_local(stories_lm, manager):
    model, tok = stories_lm
    task = multiple_choice_task(tok, [(0, 60), (300, 300)])
    hf, _ = evaluate(HFLM(pretrained=model, tokenizer=tok), [task], manager)
    reference = loglikelihoods(hf[task["task"]])
    for method in ("vanilla", "lminfinite", "sinks", "truncate", "topk"):
        for chunk in (4096, 50):
            lm = LMInfiniteLM(pretrained=model, tokenizer=tok, method=method, chunk_size=chunk)
            ours, _ = evaluate(lm, [task], manager)
            torch.testing.assert_close(loglikelihoods(ours[task["task"]]), reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_long_contexts_are_not_truncated(stories_lm, manager):
    """A 1100-token context (2x the model's length) is scored whole through the cache: the loglikelihoods are
    lminfinite.score()'s on the same tokens, vanilla and LM-Infinite; the harness's hf model (max_length 512)
    cuts the context and gets other values."""
    model, tok = stories_lm
    task = multiple_choice_task(tok, [(0, 1100)])
    doc = task["custom_dataset"]()["test"][0]
    context = tok(doc["context"])["input_ids"]
    assert len(context) > 1000
    expected = {}
    for method in ("vanilla", "lminfinite"):
        lm = LMInfiniteLM(pretrained=model, tokenizer=tok, method=method, n_local=256, chunk_size=512)
        ours = loglikelihoods(evaluate(lm, [task], manager)[0][task["task"]])[0]
        expected[method] = torch.zeros(3, dtype=torch.float64)
        for k, choice in enumerate(doc["choices"]):
            full = tok(doc["context"] + choice)["input_ids"]
            nll = lminfinite.score(model, torch.tensor([full]), chunk_size=300)[0]
            expected[method][k] = -float(nll[len(context) - 1 :].double().sum())
        torch.testing.assert_close(ours, expected[method], atol=1e-4, rtol=0)
    assert (expected["vanilla"] - expected["lminfinite"]).abs().max() > 0.01
    lminfinite.disable(model)
    hf, _ = evaluate(HFLM(pretrained=model, tokenizer=tok), [task], manager)
    assert (loglikelihoods(hf[task["task"]])[0] - expected["vanilla"]).abs().max() > 0.01  # cut to 512 tokens


# ----------------------------------------------------------------------------------- rolling perplexity


@pytest.mark.slow
def test_rolling_equals_score_with_a_bounded_cache(stories_lm, manager, monkeypatch):
    """lminfinite_ppl on a ~2000-token document (4x the model's length): the harness's rolling loglikelihood
    is -sum(lminfinite.score()) on the same tokens, and the LambdaCache holds at most n_global + n_local keys."""
    model, tok = stories_lm
    caches = []
    for_model = LambdaCache.for_model.__func__
    monkeypatch.setattr(
        LambdaCache, "for_model", classmethod(lambda cls, m: caches.append(for_model(cls, m)) or caches[-1])
    )
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok, n_local=256, chunk_size=256)
    meta = {"ppl_tokens": 2000, "ppl_docs": 1, "ppl_corpus": "tinystories_train_head.txt"}
    resps, results = evaluate(lm, ["lminfinite_ppl"], metadata=meta)
    doc = results["samples"]["lminfinite_ppl"][0]["doc"]
    ids = [tok.bos_token_id] + tok(doc["text"])["input_ids"]
    assert len(ids) > 4 * 512 - 100 and doc["n_tokens"] == len(ids) - 1
    expected = -float(lminfinite.score(model, torch.tensor([ids]), chunk_size=256)[0].double().sum())
    assert resps["lminfinite_ppl"][0][0] == pytest.approx(expected, abs=1e-6)
    token_ppl = results["results"]["lminfinite_ppl"]["token_perplexity,none"]
    assert token_ppl == pytest.approx(math.exp(-expected / doc["n_tokens"]), rel=1e-9)
    assert len(caches) == 2  # the harness's run, then our reference
    layer = caches[0].layers[0]
    assert layer.keys.shape[-2] <= 10 + 256 and int(caches[0].seen[0]) == len(ids)


@pytest.mark.slow
def test_rolling_equals_the_hf_model_within_its_length(stories_lm):
    """Documents of 400 tokens (within the model's 512): every method's rolling loglikelihood is the hf model's."""
    model, tok = stories_lm
    meta = {"ppl_tokens": 400, "ppl_docs": 2, "ppl_corpus": "tinystories_train_head.txt"}
    LMInfiniteLM(pretrained=model, tokenizer=tok, method="vanilla")  # its tokenizer sizes the documents
    hf, _ = evaluate(HFLM(pretrained=model, tokenizer=tok), ["lminfinite_ppl"], metadata=meta)
    reference = torch.tensor(hf["lminfinite_ppl"], dtype=torch.float64)
    assert reference.shape == (2, 1) and (reference < -100).all()
    for method in ("lminfinite", "truncate"):
        lm = LMInfiniteLM(pretrained=model, tokenizer=tok, method=method, chunk_size=128)
        ours, _ = evaluate(lm, ["lminfinite_ppl"], metadata=meta)
        torch.testing.assert_close(
            torch.tensor(ours["lminfinite_ppl"], dtype=torch.float64), reference, atol=1e-3, rtol=0
        )


# ------------------------------------------------------------------------------------------- generation


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lminfinite", "vanilla", "truncate", "sinks"])
def test_passkey_answers_are_those_of_our_passkey_command(stories_lm, method):
    """lminfinite_passkey's prompts are `lminfinite passkey`'s (same ids), and the harness's greedy answers are
    the tokens our own passkey evaluation generates (Method.tokens), cut at EOS."""
    model, tok = stories_lm
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok, method=method, n_local=128, chunk_size=200)
    resps, results = evaluate(lm, ["lminfinite_passkey"], metadata={"max_seq_lengths": [600], "num_samples": 2})
    trials = lmi_tasks.passkey_trials([600], 2, 0)
    m = eval_methods.get(method)
    for (length, key, depth), sample, answer in zip(
        trials, results["samples"]["lminfinite_passkey"], resps["lminfinite_passkey"], strict=True
    ):
        prompt = passkey.make_prompt(tok, length, depth, key)
        assert tok(sample["doc"]["input"])["input_ids"] == prompt and sample["doc"]["key"] == str(key)
        expected = list(m.tokens(model, prompt, 10, 128, 200))
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert answer[0] == tok.decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_generation_past_the_window_uses_the_cache(stories_lm):
    """A batch of two left-padded prompts longer than n_local: each row's greedy answer is the one it gets
    alone (prefill of a padded batch through the LambdaCache, then generate())."""
    model, tok = stories_lm
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok, n_local=100, chunk_size=64, batch_size=2)
    meta = {"max_seq_lengths": [300, 450], "num_samples": 1}
    batched, _ = evaluate(lm, ["lminfinite_passkey"], metadata=meta)
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok, n_local=100, chunk_size=64, batch_size=1)
    alone, _ = evaluate(lm, ["lminfinite_passkey"], metadata=meta)
    assert batched == alone and all(len(a[0]) > 0 for a in alone["lminfinite_passkey"])


# ---------------------------------------------------------------------------------------- offline tasks


def test_offline_task_data(stories):
    _, tok = stories
    data = lmi_tasks.needle_dataset(max_seq_lengths=[700], num_samples=3, tokenizer="stories260K", seed=1)["test"]
    assert len(data) == 3 and [round(d, 2) for d in data["depth"]] == [0.1, 0.5, 0.9]
    for doc in data:
        needle = f"The special magic number for {doc['city']} is {doc['answer']}."
        assert needle in doc["input"] and 650 <= doc["n_tokens"] <= 700
        assert doc["input"].endswith(f"The special magic number for {doc['city']} is")
        assert abs(doc["input"].index(needle) / len(doc["input"]) - doc["depth"]) < 0.15
    docs = lmi_tasks.ppl_documents(tok, read_text(asset("corpora", "alice_pg11.txt")), 1000, 3)
    assert len(docs) == 3 and all(990 <= len(tok(d, add_special_tokens=False)["input_ids"]) <= 1010 for d in docs)
    with pytest.raises(BadValue, match="max_seq_lengths"):
        lmi_tasks.passkey_dataset(max_seq_lengths=["x"], tokenizer="stories260K")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        lmi_tasks.ppl_dataset(ppl_corpus="nope.txt", tokenizer="stories260K")


def test_needle_uses_the_chat_template_when_there_is_one(stories):
    _, tok = stories

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert lmi_tasks.needle_prompt(Chat(), "TEXT", "Oslo").startswith("<user>")
    assert lmi_tasks.needle_prompt(Chat(), "TEXT", "Oslo").endswith("<assistant>The special magic number for Oslo is")
    assert "<user>" not in lmi_tasks.needle_prompt(tok, "TEXT", "Oslo")


# -------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_runs_the_offline_tasks_and_writes_results(tmp_path, capsys, stories_path):
    from lminfinite.cli import main

    meta = {"max_seq_lengths": [600], "num_samples": 1, "ppl_tokens": 700, "ppl_docs": 1}
    code = main(
        ["lm-eval", "--model", str(stories_path), "--n-local", "128", "--tasks", "lminfinite", "--limit", "1",
         "--method", "vanilla,lminfinite", "--metadata", json.dumps(meta), "--output-path", str(tmp_path),
         "--bootstrap-iters", "0"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "|lminfinite_passkey|" in out and "| lminfinite_ppl | token_perplexity |" in out
    files = sorted(tmp_path.rglob("results_*.json"))
    assert len(files) == 2
    runs = [json.loads(f.read_text()) for f in files]
    assert {r["config"]["lminfinite"]["method"] for r in runs} == {"vanilla", "lminfinite"}
    for r in runs:
        assert set(r["results"]) == {"lminfinite_passkey", "lminfinite_needle", "lminfinite_ppl"}
        assert r["results"]["lminfinite_ppl"]["token_perplexity,none"] > 1
        assert r["config"]["model"] == "lminfinite" and "n_local=128" in r["config"]["model_args"]


def test_cli_errors_are_one_line(capsys, stories_path):
    from lminfinite.cli import main

    base = ["lm-eval", "--model", str(stories_path), "--limit", "1"]
    assert main([*base, "--tasks", "lminfinite_ppl", "--metadata", "[1]"]) == 2
    assert "--metadata must be a JSON object" in capsys.readouterr().err
    assert main([*base, "--tasks", "lminfinite_ppl", "--log-samples"]) == 2
    assert "--log-samples needs --output-path" in capsys.readouterr().err
    assert main([*base, "--tasks", "lminfinite_ppl", "--method", "vanilla", "--top-k", "3"]) == 2
    assert "does not take top_k=3" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_unknown_task(capsys, stories_path):
    from lminfinite.cli import main

    assert main(["lm-eval", "--model", str(stories_path), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown task(s) no_such_task_xyz" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_loglikelihoods_equal_the_hf_model(manager):
    """The real 135M chat model (GGUF asset): contexts <= n_local give the harness's hf loglikelihoods."""
    path = asset("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path.exists():
        pytest.skip(f"SmolLM2 GGUF not found at {path}")
    from lminfinite.models import load_model

    model, tok = load_model("smollm2")
    task = multiple_choice_task(tok, [(0, 40), (200, 150)])
    hf, _ = evaluate(HFLM(pretrained=model, tokenizer=tok), [task], manager)
    try:
        ours, _ = evaluate(LMInfiniteLM(pretrained=model, tokenizer=tok, n_local=256, chunk_size=64), [task], manager)
    finally:
        lminfinite.disable(model)
    reference = loglikelihoods(hf[task["task"]])
    assert reference.shape == (2, 3)
    torch.testing.assert_close(loglikelihoods(ours[task["task"]]), reference, atol=1e-4, rtol=0)
