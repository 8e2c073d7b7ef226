"""Serve under hostile load, on loopback: what well-behaved clients get while hostile ones attack, and the
server's peak RSS.

`lminfinite serve` runs in its own process on 127.0.0.1 (a free port, stories260K, one API key). Two phases of
`--seconds` each, both with the same `--clients` well-behaved clients (each sends greedy chat requests of
`--max-tokens` tokens one after the other; on a 429 or 503 it waits `Retry-After`, capped at 0.2 s, and
retries):

1. quiet: the well-behaved clients alone (the baseline);
2. hostile: the same clients while, at the same time,
   - slow heads: `--slow` connections that send a request head one byte per second (reconnecting when closed);
   - slow bodies: `--slow` connections that send a head and then a body one byte per second;
   - abandoned requests: a client that posts 2000-token non-streaming requests and closes its socket 0.3 s
     later, over and over;
   - oversized bodies: 6 clients that post one 900,000-character message (2.7 MB of '猫') over and over;
   - a burst past the limit: every 2 s, 40 short requests at once (`--max-concurrency` is 8).

Reported per phase: requests served per second to the well-behaved clients (200s only), their p50/p95
latency, their 429s and 503s; the hostile traffic's outcomes; the server's counters (no 500 may appear); the CPU
seconds the server and the clients (this process) used; and the server's peak RSS (its VmHWM, reset at the start
of each phase) against its idle RSS. The clients stand in for clients on other machines: once the server is up,
this process lowers its own CPU priority (`--client-nice 19`), so that on a small machine the server is not
measured against its attackers' own CPU use.

    python benchmarks/serve_hostile.py [--seconds 30] [--clients 4] [--slow 20] [--max-tokens 16] [--threads 1]
        [--attacks slow,abandoned,oversized,burst] [--breakdown]

`--breakdown` runs quiet, each attack alone, all of them together, and quiet again (the second quiet phase
shows how much the machine itself changed meanwhile).

Writes benchmarks/results/serve_hostile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from common import RESULTS, environment

from lminfinite.serve.metrics import parse_metrics

ATTACKS = ("slow", "abandoned", "oversized", "burst")
KEY = "bench-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MESSAGES = ["Tell me a story about a cat.", "Where is the red ball?", "What did mom say?", "Was the dog happy?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lminfinite serve` in a subprocess on 127.0.0.1, with its RSS read from /proc."""

    def __init__(self, args):
        self.host, self.port = "127.0.0.1", free_port()
        self.url = f"http://{self.host}:{self.port}"
        cmd = [sys.executable, "-m", "lminfinite.cli", "serve", "--model", "stories260K", "--port", str(self.port)]
        cmd += ["--n-global", "4", "--n-local", "256", "--api-key", KEY, "--log-level", "warning"]
        cmd += ["--max-concurrency", "8", "--read-timeout", str(args.read_timeout), "--max-connections", "64"]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 300 s")
            time.sleep(0.3)
        body = {"model": "stories260K", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=60)  # warm-up

    def _status(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        return self._status("VmHWM")

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=30).text)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)


def _own_cpu_s() -> float:
    usage = os.times()
    return usage.user + usage.system


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 4)


def well_behaved(server: Server, stop: threading.Event, args, w: int, out: list, lock: threading.Lock) -> None:
    """Greedy chat requests one after the other; on a 429, wait Retry-After (capped at 0.2 s) and retry."""
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=120) as http:
        i = 0
        while not stop.is_set():
            body = {
                "model": "stories260K",
                "messages": [{"role": "user", "content": f"{MESSAGES[(w + i) % 4]} (client {w}, request {i})"}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            start = time.perf_counter()
            try:
                r = http.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                with lock:
                    out.append({"status": type(e).__name__, "latency_s": time.perf_counter() - start})
                continue
            with lock:
                out.append(
                    {"status": r.status_code, "latency_s": time.perf_counter() - start, "at": time.perf_counter()}
                )
            if r.status_code in (429, 503):  # over the limit: retry shortly
                stop.wait(min(0.2, float(r.headers.get("retry-after", "1"))))
            else:
                i += 1


def _tally(outcomes: Counter, what: str, lock: threading.Lock) -> None:
    with lock:
        outcomes[what] += 1


def _head_of(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode("latin-1")[9:12] if answer.startswith(b"HTTP/1.") else "closed"


def slow_head(server: Server, stop: threading.Event, outcomes: Counter, lock: threading.Lock) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
    while not stop.is_set():
        try:
            with socket.create_connection((server.host, server.port), timeout=5) as sock:
                for byte in head:
                    sock.sendall(bytes([byte]))
                    if stop.wait(1.0):
                        return
                _tally(outcomes, "slow head: sent whole head", lock)
        except OSError:
            _tally(outcomes, "slow head: closed by the server", lock)


def slow_body(server: Server, stop: threading.Event, outcomes: Counter, lock: threading.Lock) -> None:
    body = json.dumps({"model": "stories260K", "messages": [{"role": "user", "content": "x" * 200}]}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            with socket.create_connection((server.host, server.port), timeout=5) as sock:
                sock.sendall(head)
                for byte in body:
                    sock.sendall(bytes([byte]))
                    if stop.wait(1.0):
                        return
                _tally(outcomes, "slow body: sent whole body", lock)
        except OSError:
            _tally(outcomes, "slow body: closed by the server", lock)


def abandoned(server: Server, stop: threading.Event, outcomes: Counter, lock: threading.Lock) -> None:
    body = json.dumps(
        {
            "model": "stories260K",
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 2000,
            "ignore_eos": True,
            "temperature": 0,
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    while not stop.is_set():
        try:
            with socket.create_connection((server.host, server.port), timeout=5) as sock:
                sock.sendall(request)
                stop.wait(0.3)
            _tally(outcomes, "abandoned after 0.3 s", lock)
        except OSError:
            _tally(outcomes, "abandoned: refused", lock)


def oversized(server: Server, stop: threading.Event, outcomes: Counter, lock: threading.Lock, payload: bytes) -> None:
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=120) as http:
        while not stop.is_set():
            try:
                r = http.post("/v1/chat/completions", content=payload)
                _tally(outcomes, f"2.7 MB prompt: {r.status_code} {r.json()['error']['code']}", lock)
            except httpx.HTTPError as e:
                _tally(outcomes, f"2.7 MB prompt: {type(e).__name__}", lock)


def burst(server: Server, stop: threading.Event, outcomes: Counter, lock: threading.Lock) -> None:
    body = {"model": "stories260K", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}

    def one() -> None:
        try:
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=120)
            _tally(outcomes, f"burst: {r.status_code}", lock)
        except httpx.HTTPError as e:
            _tally(outcomes, f"burst: {type(e).__name__}", lock)

    while not stop.is_set():
        threads = [threading.Thread(target=one) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.wait(2.0)


def phase(server: Server, args, attacks: str) -> dict:
    """`--seconds` of the well-behaved clients beside the hostile ones named in `attacks` (comma-separated;
    empty: none)."""
    stop, lock = threading.Event(), threading.Lock()
    served: list[dict] = []
    outcomes: Counter = Counter()
    before = server.metrics()
    cpu_server, cpu_clients = server.cpu_s(), _own_cpu_s()
    server.reset_peak()
    rss_start = server.rss_mb()
    threads = [
        threading.Thread(target=well_behaved, args=(server, stop, args, w, served, lock)) for w in range(args.clients)
    ]
    hostile = bool(attacks)
    kinds = set(attacks.split(",")) if attacks else set()
    common = (server, stop, outcomes, lock)
    if "slow" in kinds:
        threads += [threading.Thread(target=slow_head, args=common) for _ in range(args.slow)]
        threads += [threading.Thread(target=slow_body, args=common) for _ in range(args.slow)]
    if "abandoned" in kinds:
        threads += [threading.Thread(target=abandoned, args=common)]
    if "oversized" in kinds:
        payload = json.dumps(
            {"model": "stories260K", "messages": [{"role": "user", "content": "猫" * 900_000}]}, ensure_ascii=False
        ).encode()
        threads += [threading.Thread(target=oversized, args=(*common, payload)) for _ in range(6)]
    if "burst" in kinds:
        threads += [threading.Thread(target=burst, args=common)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(args.seconds)
    stop.set()
    for t in threads:
        t.join(180)
    wall = time.perf_counter() - start
    cpu_server, cpu_clients = server.cpu_s() - cpu_server, _own_cpu_s() - cpu_clients
    after = server.metrics()
    ok = [r for r in served if r["status"] == 200 and r["at"] - start <= args.seconds]
    latencies = [r["latency_s"] for r in ok]
    counters = {k.removeprefix("lminfinite_"): after[k] - before.get(k, 0) for k in after if "_total" in k}
    return {
        "phase": f"hostile: {attacks}" if hostile else "quiet",
        "seconds": args.seconds,
        "wall_s": round(wall, 1),
        "well_behaved": {
            "clients": args.clients,
            "served": len(ok),
            "served_per_s": round(len(ok) / args.seconds, 3),
            "latency_p50_s": pct(latencies, 0.5),
            "latency_p95_s": pct(latencies, 0.95),
            "statuses": dict(Counter(str(r["status"]) for r in served)),
        },
        "hostile": dict(sorted(outcomes.items())),
        "server_counters": {k: v for k, v in sorted(counters.items()) if v},
        "server_500s": sum(v for k, v in counters.items() if 'status="500"' in k),
        "cpu_s": {"server": round(cpu_server, 1), "clients (this process)": round(cpu_clients, 1)},
        "server_rss_start_mb": round(rss_start, 1),
        "server_peak_rss_mb": round(server.peak_mb(), 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30, help="length of each phase")
    p.add_argument("--clients", type=int, default=4, help="well-behaved clients")
    p.add_argument("--slow", type=int, default=20, help="slow-head connections, and as many slow-body ones")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per well-behaved answer")
    p.add_argument("--read-timeout", type=float, default=5.0, help="the server's --read-timeout")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (0: torch's default)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="the hostile clients of phase 2")
    p.add_argument("--client-nice", type=int, default=19, help="nice increment of this (client) process after start")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="phases: quiet, each attack alone, all together, quiet again (instead of quiet, then --attacks)",
    )
    p.add_argument("--out", default=str(RESULTS / "serve_hostile.json"))
    args = p.parse_args(argv)
    result = {"benchmark": "serve_hostile", "environment": environment(), "config": vars(args)}
    start = time.perf_counter()
    server = Server(args)
    # The clients, well-behaved and hostile, stand in for clients on other machines: they run at the lowest CPU
    # priority, so that the server is not measured against its own attackers' CPU use on a small machine.
    result["client_nice"] = os.nice(args.client_nice) if args.client_nice else os.nice(0)
    try:
        result["server_idle_rss_mb"] = round(server.rss_mb(), 1)
        result["phases"] = []
        plan = ["", args.attacks] if not args.breakdown else ["", *ATTACKS, ",".join(ATTACKS), ""]
        for attacks in plan:
            row = phase(server, args, attacks)
            print(json.dumps(row), flush=True)
            result["phases"].append(row)
        result["server_alive_after"] = httpx.get(f"{server.url}/health", timeout=30).json()["status"]
    finally:
        server.stop()
    quiet = [r for r in result["phases"] if r["phase"] == "quiet"]
    base = statistics.mean(r["well_behaved"]["served_per_s"] for r in quiet)
    result["summary"] = {
        "served_per_s_quiet": [r["well_behaved"]["served_per_s"] for r in quiet],
        "served_per_s_hostile": {
            r["phase"].removeprefix("hostile: "): r["well_behaved"]["served_per_s"]
            for r in result["phases"]
            if r["phase"] != "quiet"
        },
        "ratio_to_quiet_mean": {
            r["phase"].removeprefix("hostile: "): round(r["well_behaved"]["served_per_s"] / max(1e-9, base), 3)
            for r in result["phases"]
            if r["phase"] != "quiet"
        },
        "idle_rss_mb": result["server_idle_rss_mb"],
        "peak_rss_mb": max(r["server_peak_rss_mb"] for r in result["phases"]),
        "peak_above_idle_mb": round(
            max(r["server_peak_rss_mb"] for r in result["phases"]) - result["server_idle_rss_mb"], 1
        ),
        "server_500s": sum(r["server_500s"] for r in result["phases"]),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
