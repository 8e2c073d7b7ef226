"""The library's shape: the core never imports a tool and has no import cycles (import-linter contracts in
pyproject.toml), `import lminfinite` loads no tool, the public API is `__all__`, one registry of backends,
and every core module's docstring says what it owns."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lminfinite

ROOT = Path(__file__).resolve().parents[1]
CORE = [
    "api",
    "alibi",
    "attention",
    "cache",
    "config",
    "context",
    "families",
    "plan",
    "positions",
    "rule",
    "scoring",
    "streaming",
    "kernels/__init__",
    "kernels/common",
    "kernels/naive",
    "kernels/torch_chunked",
    "kernels/flex",
    "kernels/topk",
]
TOOLS = ("lminfinite.models", "lminfinite.eval", "lminfinite.cli", "lminfinite.chat", "lminfinite.serve")


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_importing_the_library_loads_no_tool():
    code = "import sys, lminfinite; print(sorted(m for m in sys.modules if m.startswith(%r) or m == 'matplotlib'))"
    done = subprocess.run([sys.executable, "-c", code % (TOOLS,)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_public_api_is_all():
    assert set(lminfinite.__all__) == {
        "enable",
        "disable",
        "is_enabled",
        "config_of",
        "LambdaCache",
        "LambdaConfig",
        "prefill",
        "score",
        "stream",
        "load_model",
        "load_llama2c",
    }
    for name in lminfinite.__all__:
        assert callable(getattr(lminfinite, name)), name


def test_one_registry_of_backends():
    from lminfinite import config, kernels

    assert config.BACKENDS is kernels.BACKENDS == ("auto", *kernels.KERNEL_MODULES)
    for name in kernels.BACKENDS:
        assert callable(kernels.get_kernel(name))
    with pytest.raises(ValueError, match="backend"):
        lminfinite.LambdaConfig(backend="cuda-magic")


@pytest.mark.parametrize("module", CORE)
def test_every_core_module_says_what_it_owns(module):
    source = (ROOT / "src" / "lminfinite" / f"{module}.py").read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc and len(doc.splitlines()[0].split()) >= 4, f"{module}.py needs a first docstring line"
