"""The README's Python examples run as written, in order, in one namespace (on stories260K)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import lminfinite

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # the chat example loads SmolLM2
def test_readme_python_blocks_run(stories_path, monkeypatch, capsys):
    text = README.read_text()
    # Blocks marked `<!-- not run by tests/test_readme.py: WHY -->` need what a test cannot have (a running
    # server, the hub, vLLM); every other Python block runs, in order, in one namespace.
    found = re.findall(r"(<!-- not run by tests/test_readme\.py: [^>]+ -->\n)?```python\n(.*?)```", text, flags=re.S)
    blocks = [code for marker, code in found if not marker]
    assert len(blocks) >= 3 and len(found) - len(blocks) <= 3
    for path in re.findall(r'"(\.\./shared/[^"]+)"', text):
        if not (README.parent / path).exists():
            pytest.skip(f"the README's example path {path} is not here")
    monkeypatch.chdir(README.parent)  # the examples use paths relative to the project root
    namespace: dict = {}
    checked = False
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
        if "top_k=5" in block:  # the Use example and its top-k line, before later examples load other models
            model = namespace["model"]
            assert lminfinite.is_enabled(model) and model._lminfinite.config.top_k == 5
            assert namespace["nll"].shape == (1, namespace["long_ids"].shape[1] - 1)
            assert torch.isfinite(namespace["nll"]).all()
            checked = True
    assert checked
    assert len(capsys.readouterr().out) > 20  # the decoded continuation and the stream were printed


# ------------------------------------------------------------------------- the README's commands (shell)


def _bash_commands(text: str) -> list[str]:
    """The commands of the README's bash blocks, continuation lines joined, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return commands


def _inline_commands(text: str) -> list[str]:
    """Inline code spans that are whole commands (`lminfinite ...`, `python benchmarks/...`)."""
    spans = re.findall(r"`([^`\n]+)`", text)
    return [s for s in spans if re.match(r"(\.venv/bin/)?(lminfinite|python) \S", s)]


def _run_all_parser():
    import importlib.util

    script = README.parent / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("run_all_for_readme", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_readme_commands_parse_with_the_current_options():
    """Every `lminfinite ...` and `python benchmarks/run_all.py ...` command the README shows is accepted as
    written by today's parsers (renamed or removed options fail here)."""
    from lminfinite import cli

    text = README.read_text()
    commands = _bash_commands(text) + _inline_commands(text)
    checked = 0
    for command in commands:
        argv = shlex.split(command, comments=True)
        if not argv:
            continue
        program = Path(argv[0]).name
        if program == "lminfinite":
            parser = cli.build_parser()
        elif program.startswith("python") and argv[1:2] == ["benchmarks/run_all.py"]:
            parser, argv = _run_all_parser(), argv[1:]
        else:
            continue
        try:
            parser.parse_args(argv[1:])
        except (SystemExit, cli.CliError) as e:
            raise AssertionError(f"the README's command does not parse: {command}\n{e}") from None
        checked += 1
    assert checked >= 10


def test_readme_commands_run_as_written_in_a_fresh_clone():
    """The console script is reachable as written: `.venv/bin/lminfinite` (or after activating the venv), the
    benchmark scripts with the venv's Python; quoted run times say they hold on a quiet machine."""
    text = README.read_text()
    activated = False
    for command in _bash_commands(text):
        if re.match(r"(source|\.) \.venv/bin/activate", command):
            activated = True
        argv = shlex.split(command, comments=True)
        program = argv[0] if argv else ""
        if program == "lminfinite":
            assert activated, f"{command!r}: `lminfinite` is not on PATH in a fresh clone; write .venv/bin/lminfinite"
        if program in ("python", "python3") and argv[1:3] != ["-m", "venv"]:  # the system Python makes a venv
            assert activated, f"{command!r}: use .venv/bin/python"
    for command in _inline_commands(text):
        program = command.split()[0]
        assert program not in ("python", "python3", "lminfinite") or activated, f"inline command {command!r}"
    times = re.findall(r"\((?:about )?\d+(?:\.\d+)? (?:s|seconds|minutes?)\b[^)]*\)", text)
    assert times, "the README quotes run times"
    for quote in times:
        assert "quiet" in quote, f"run time quoted without 'on a quiet ... machine': {quote}"
