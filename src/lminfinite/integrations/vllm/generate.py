"""Run one vLLM engine on prompts given as token ids and write what it generated as JSON (a tool for the
plugin's tests and benchmarks: each engine runs in a process of its own, as vLLM wants).

    python -m lminfinite.integrations.vllm.generate JOB.json OUT.json

JOB: {"model": folder, "engine": {LLM keyword arguments}, "prompts": [[token ids], ...],
      "runs": [[prompt indices], ...] (each run is one `generate` call, a batch), "max_tokens": 16,
      "logprobs": 0}
OUT: {"runs": [[{"token_ids": [...], "logprobs": [...], "num_cached_tokens": n}, ...], ...], "seconds": [...],
      "start_seconds": s}  (num_cached_tokens: prompt tokens vLLM took from its prefix cache)
Sampling is greedy (temperature 0). `logprobs` > 0 also records each generated token's log-probability.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=job["model"], **job.get("engine", {}))
    started = time.perf_counter() - start
    params = SamplingParams(
        max_tokens=int(job.get("max_tokens", 16)),
        temperature=0.0,
        logprobs=int(job["logprobs"]) if job.get("logprobs") else None,
        ignore_eos=bool(job.get("ignore_eos", True)),
    )
    prompts = job["prompts"]
    runs, seconds = [], []
    for indices in job.get("runs", [list(range(len(prompts)))]):
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in indices], params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        batch = []
        for out in outs:
            completion = out.outputs[0]
            record = {"token_ids": list(completion.token_ids), "num_cached_tokens": out.num_cached_tokens}
            if completion.logprobs is not None:
                record["logprobs"] = [
                    lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)
                ]
            batch.append(record)
        runs.append(batch)
    return {"runs": runs, "seconds": seconds, "start_seconds": started}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    result = run(job)
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
