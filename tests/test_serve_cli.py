"""`lminfinite serve` as a process: argument errors, start-up, a long conversation with the server's RSS flat, and a
clean stop on SIGINT."""

from __future__ import annotations

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
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
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
