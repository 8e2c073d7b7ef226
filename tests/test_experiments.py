"""The experiment scripts' helpers (experiments/common.py, passkey.py, needle.py): resumable partial
files, greedy answers equal to the eval suite's, deterministic prompts. Small and fast (stories260K)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = str(Path(__file__).resolve().parent.parent / "experiments")
sys.path.insert(0, EXPERIMENTS)

import common  # noqa: E402
import needle  # noqa: E402
import passkey  # noqa: E402

# The scripts' top-level names (`common` above all: benchmarks/ has a `common` too) leave sys.path and
# sys.modules as they were, so that later tests import their own.
sys.path.remove(EXPERIMENTS)
for _name in ("common", "needle", "passkey"):
    sys.modules.pop(_name, None)

from lminfinite.models.assets import asset  # noqa: E402

STORIES = asset("models", "stories260K", "stories260K.bin")


def test_partial_resumes_and_separates_settings(tmp_path):
    p = common.Partial(tmp_path, "run", {"n_local": 8})
    p.add(common.item_key("a", 1), {"value": 1.5})
    p.add(common.item_key("b", 2), {"value": 2.5})
    with open(p.path, "a") as f:  # a line cut short by a kill is skipped, not fatal
        f.write('{"key": "c|3", "val')
    again = common.Partial(tmp_path, "run", {"n_local": 8})
    assert "a|1" in again and "b|2" in again and "c|3" not in again
    assert sorted(r["value"] for r in again.values()) == [1.5, 2.5]
    other = common.Partial(tmp_path, "run", {"n_local": 16})  # other settings: another file, nothing done
    assert other.path != p.path and not other.values()
    assert json.loads(p.path.read_text().splitlines()[0]) == {"key": "a|1", "value": 1.5}
    with pytest.raises(ValueError, match="key"):  # the item's key must not be overwritten by a field
        p.add("d|4", {"key": 12345})


def test_parsers_reject_bad_lists():
    assert common.parse_ints("2048, 4096") == [2048, 4096]
    assert common.parse_floats("0.2,0.8") == [0.2, 0.8]
    with pytest.raises(ValueError):
        common.parse_floats("0.5,1.5")
    with pytest.raises(ValueError):
        common.parse_ints(",")
    with pytest.raises(ValueError):
        common.parse_methods("vanilla,nope")


def test_reports_list_methods_in_one_order_whichever_run_came_last():
    runs = ["memory:8:128:float16:heads", "lminfinite", "memory", "vanilla", "memory:16", "topk", "lminfinite"]
    expected = ["vanilla", "lminfinite", "topk", "memory", "memory:16", "memory:8:128:float16:heads"]
    assert common.method_order(runs) == expected
    assert common.method_order(list(reversed(runs))) == expected
    assert common.method_order(["mystery", "vanilla"]) == ["vanilla", "mystery"]  # unknown families last


def test_passkey_keys_depend_on_coordinates_only():
    assert passkey.passkey(0, 2048, 0.5, 0) == passkey.passkey(0, 2048, 0.5, 0)
    keys = {passkey.passkey(0, n, d, s) for n in (2048, 4096) for d in (0.2, 0.5) for s in range(3)}
    assert len(keys) == 12 and all(10000 <= k <= 99999 for k in keys)
    rows = passkey.summary(
        [{"method": "m", "length": 8, "depth": d, "correct": c} for d, c in ((0.2, True), (0.2, False), (0.8, True))]
    )
    assert {(r["depth"], r["accuracy"], r["samples"]) for r in rows} == {
        (0.2, 0.5, 2),
        (0.8, 1.0, 1),
        ("all", 2 / 3, 3),
    }


def test_needle_goes_after_the_sentence_end_nearest_the_depth():
    text = "One. Two two. Three three three. Four."
    assert needle.insert_at_sentence(text, "X.", 0.0) == "One. X. Two two. Three three three. Four."
    assert needle.insert_at_sentence(text, "X.", 0.5) == "One. Two two. X. Three three three. Four."
    assert needle.insert_at_sentence("no end here", "X.", 0.5) == "no end X.  here"  # no sentence end: at the depth


@pytest.mark.skipif(not STORIES.is_file(), reason="stories260K asset missing")
@pytest.mark.parametrize(
    "method", ["lminfinite", *(pytest.param(m, marks=pytest.mark.slow) for m in ("vanilla", "topk", "truncate"))]
)
def test_greedy_answer_equals_the_eval_suites_greedy(method):
    from lminfinite.eval.methods import greedy
    from lminfinite.models import load_model

    model, _ = load_model("stories260K")
    prompt = [1] + torch.randint(3, 512, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    mine = common.greedy_answer(model, prompt, 6, method, n_global=4, n_local=64, chunk_size=40)
    assert mine == greedy(model, prompt, 6, method, 4, 64, chunk_size=40)
    assert len(mine) == 6
