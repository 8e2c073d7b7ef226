"""`lminfinite serve` as a process: argument errors, start-up, a long conversation with the server's RSS flat, a
clean stop on SIGINT, and SIGTERM ending an open stream with a final event."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lminfinite.cli import main
from lminfinite.models.assets import asset
from lminfinite.serve.metrics import parse_metrics

needs_stories = pytest.mark.skipif(
    not asset("models", "stories260K", "stories260K.bin").exists(), reason="stories260K asset not found"
)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "not a port"),
        (["--max-sessions", "-1"], "integer >= 0"),
        (["--max-cache-mb", "0"], "positive number"),
        (["--max-concurrency", "0"], "positive integer"),
        (["--api-key-file", "/nonexistent/keys"], "--api-key-file"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lminfinite: error:") and message in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    """Poll /health until the server answers (a condition with a deadline; the process must stay alive)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def serve_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lminfinite.cli", "serve", "--model", "stories260K", "--n-global", "4",
            "--n-local", "64", "--port", str(port), "--log-level", "warning", "--threads", "1", *extra]  # fmt: skip


@needs_stories
@pytest.mark.slow  # a subprocess
def test_cli_server_sigterm_ends_an_open_stream_with_a_final_event():
    """SIGTERM to `lminfinite serve` with a stream open (issue 21 item 7): the stream ends with an error event
    (503, shutting down) and [DONE], the chunked response is complete, and the server exits (by the signal, as
    uvicorn re-raises it) with no traceback."""
    port = free_port()
    proc = subprocess.Popen(
        serve_command(port, "--shutdown-grace", "3", "--max-tokens-cap", "100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url)
        body = {"model": "stories260K", "prompt": "Once", "max_tokens": 100000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]  # no incomplete chunked read
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "service_unavailable"
        # uvicorn re-raises the signal once it has shut down gracefully: the conventional "ended by SIGTERM"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)


@needs_stories
@pytest.mark.slow
def test_cli_server_long_conversation_flat_rss(tmp_path):
    """A conversation to 20x n_local through the command-line server: each turn reuses the session, the server's
    RSS after the window is full stays within a few MiB, and SIGINT stops it with exit code 0."""
    import psutil
    from openai import OpenAI

    keys = tmp_path / "keys"
    keys.write_text("secret-1\n\nsecret-2\n")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lminfinite.cli",
        "serve",
        "--model",
        "stories260K",
        "--n-global",
        "4",
        "--n-local",
        "64",
    ]
    cmd += ["--port", str(port), "--api-key-file", str(keys), "--log-level", "warning", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(proc, url)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        client = OpenAI(base_url=f"{url}/v1", api_key="secret-2", max_retries=0)
        server = psutil.Process(proc.pid)
        history, rss, cached, total = [], [], [], 0
        lines = ["Tell me a story.", "What happened next?", "Was the dog happy?", "Where is the ball?"]
        turn = 0
        while total < 20 * 64:
            history.append({"role": "user", "content": lines[turn % 4]})
            r = client.chat.completions.create(model="stories260K", messages=history, max_tokens=24, temperature=0)
            history.append({"role": "assistant", "content": r.choices[0].message.content})
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
            total = r.usage.total_tokens
            rss.append(server.memory_info().rss)
            turn += 1
        assert all(c > 0 for c in cached[1:])
        m = parse_metrics(httpx.get(f"{url}/metrics").text)
        assert m['lminfinite_session_lookups_total{result="token_prefix"}'] == turn - 1
        assert m["lminfinite_sessions"] == 1
        growth = (rss[-1] - rss[5]) / 2**20
        print(
            f"server RSS {rss[5] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB from turn 5 to turn {turn} ({total} tokens)"
        )
        assert growth < 8, f"server RSS grew by {growth:.1f} MiB from turn 5 to turn {turn} ({total} tokens)"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            raise
    assert code == 0
