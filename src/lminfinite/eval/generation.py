"""Generation quality past the pretraining length (the paper's BLEU / ROUGE check).

A long text is cut at several positions; from each cut the model continues greedily for
`new_tokens` tokens, and the continuation is scored against the text's true continuation with
BLEU (sacrebleu, sentence level, 0-100) and ROUGE-L F1 (rouge-score, 0-1), computed locally.
Sample k uses the text's k-th segment of `max(positions) + new_tokens` tokens, so samples never overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import BadValue, MissingDependency
from .methods import Method, get
from .progress import progress_bar


def scorers():
    """(bleu(hyp, ref), rouge_l(hyp, ref)); a one-line ImportError when the `eval` extra is missing."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise MissingDependency(
            "gen-eval needs sacrebleu and rouge-score: pip install 'lminfinite[eval]' "
            "(or: pip install sacrebleu rouge-score)"
        ) from None
    rouge = rouge_scorer.RougeScorer(["rougeL"])

    def bleu(hyp: str, ref: str) -> float:
        return float(sacrebleu.sentence_bleu(hyp, [ref]).score)

    def rouge_l(hyp: str, ref: str) -> float:
        return float(rouge.score(ref, hyp)["rougeL"].fmeasure)

    return bleu, rouge_l


def evaluate(
    model: nn.Module,
    tokenizer,
    ids: Sequence[int],
    methods: Sequence[str | Method],
    positions: Sequence[int],
    samples: int,
    n_global: int,
    n_local: int,
    new_tokens: int = 100,
    chunk_size: int = 4096,
    progress: bool | None = None,
) -> list[dict]:
    """Rows `{method, position, samples, bleu, rougeL}` (means over samples) for text token `ids` (no BOS)."""
    bleu, rouge_l = scorers()
    span = max(positions) + new_tokens
    if len(ids) < samples * span:
        raise BadValue(
            f"the text has {len(ids)} tokens; {samples} samples cut at up to {max(positions)} tokens plus "
            f"{new_tokens} new tokens need {samples * span}"
        )
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    methods = [get(m) for m in methods]
    rows = []
    bar = progress_bar(len(methods) * len(positions) * samples, "gen-eval", "text", progress)
    for method in methods:
        bar.set_postfix_str(method.name)
        with method.applied(model, n_global, n_local):  # once per method, for all its prompts
            for position in positions:
                scores = []
                for k in range(samples):
                    segment = list(ids[k * span : (k + 1) * span])
                    prompt = bos + segment[:position]
                    new = list(method.tokens(model, prompt, new_tokens, n_local, chunk_size))
                    hyp = tokenizer.decode(new, skip_special_tokens=True)
                    ref = tokenizer.decode(segment[position : position + new_tokens], skip_special_tokens=True)
                    scores.append((bleu(hyp, ref), rouge_l(hyp, ref)))
                    bar.update()
                rows.append(_row(method.name, position, scores))
    bar.close()
    return rows


def _row(method: str, position: int, scores: list[tuple[float, float]]) -> dict:
    n = len(scores)
    return {
        "method": method,
        "position": position,
        "samples": n,
        "bleu": sum(b for b, _ in scores) / n,
        "rougeL": sum(r for _, r in scores) / n,
    }
