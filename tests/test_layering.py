"""The library's shape: the core never imports a tool and no package has an import cycle (import-linter contracts
in pyproject.toml, every one reported kept), the lists that say what is core agree with the package itself,
`import lminfinite` loads no tool, the public API is `__all__` (typed, documented, defined in the core), one
registry of backends, and every core module's docstring says what it owns."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lminfinite

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lminfinite"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACTS = PYPROJECT["tool"]["importlinter"]["contracts"]
FORBIDDEN = next(c for c in CONTRACTS if c["type"] == "forbidden")
LAYERS = next(c for c in CONTRACTS if c["type"] == "layers")
# The one list of tools: the lminfinite packages the core may not import.
TOOLS = tuple(m for m in FORBIDDEN["forbidden_modules"] if m.startswith("lminfinite."))


def _top_level() -> set[str]:
    """Every module and package directly under lminfinite (not the package's own __init__)."""
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return {f"lminfinite.{n}" for n in names}


CORE = sorted(_top_level() - set(TOOLS))


def _files(module: str) -> list[Path]:
    """The source files of a top-level module (a package: all of its files)."""
    path = PACKAGE / module.removeprefix("lminfinite.")
    return [path.with_suffix(".py")] if path.with_suffix(".py").is_file() else sorted(path.rglob("*.py"))


CORE_FILES = sorted(str(p.relative_to(PACKAGE).with_suffix("")) for name in CORE for p in _files(name))


def test_the_core_lists_agree_with_the_package():
    """The core is every module beside the tools: pyproject's forbidden contract, its layers and mypy's files name
    exactly that (a module added to the core, e.g. memory.py or decoding.py, must be in all three), and the tools
    named there are the package's other top-level entries."""
    assert set(TOOLS) <= _top_level(), set(TOOLS) - _top_level()
    assert {"lminfinite.api", "lminfinite.streaming", "lminfinite.decoding", "lminfinite.kernels"} <= set(CORE)
    assert sorted(FORBIDDEN["source_modules"]) == CORE
    assert sorted(LAYERS["layers"]) == CORE
    mypy = {f.removeprefix("src/").removesuffix(".py").replace("/", ".") for f in PYPROJECT["tool"]["mypy"]["files"]}
    assert mypy == {"lminfinite.__init__", *CORE}


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = " ".join(done.stdout.split())  # import-linter wraps long contract names
    for contract in CONTRACTS:
        assert f"{contract['name']} KEPT" in report, contract["name"]
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in report
    kinds = {c["type"] for c in CONTRACTS}
    assert {"forbidden", "layers", "acyclic_siblings"} <= kinds
    acyclic = {a for c in CONTRACTS if c["type"] == "acyclic_siblings" for a in c["ancestors"]}
    packages = {"lminfinite"} | {n for n in _top_level() if (PACKAGE / n[11:] / "__init__.py").is_file()}
    assert packages <= acyclic, packages - acyclic  # every package is checked for cycles


def test_no_module_imports_itself_back():
    """No import cycle between any two modules of the package, imports inside functions included (grimp, the graph
    import-linter builds)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("lminfinite")
    cycles = [
        (m, d)
        for m in sorted(graph.modules)
        for d in graph.find_modules_directly_imported_by(m)
        if not m.startswith(d + ".") and graph.find_shortest_chain(importer=d, imported=m)
    ]
    assert not cycles, cycles


@pytest.mark.slow
def test_importing_the_library_loads_no_tool():
    code = "import sys, lminfinite; print(sorted(m for m in sys.modules if m.startswith(%r) or m == 'matplotlib'))"
    done = subprocess.run([sys.executable, "-c", code % (TOOLS,)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_public_api_is_all():
    """`__all__` is exactly the public API. Its functions and classes are defined in the core (the two loaders in
    lminfinite.models, loaded on first use), documented, and the functions' parameters and results typed
    (a tokenizer is duck-typed)."""
    assert set(lminfinite.__all__) == {
        "enable",
        "disable",
        "is_enabled",
        "config_of",
        "LambdaCache",
        "LambdaConfig",
        "BlockMemory",
        "prefill",
        "score",
        "stream",
        "load_model",
        "load_llama2c",
    }
    loaders = {"load_model", "load_llama2c"}
    for name in lminfinite.__all__:
        obj = getattr(lminfinite, name)
        assert inspect.isfunction(obj) or inspect.isclass(obj), name
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        home = obj.__module__
        if name in loaders:
            assert home.startswith("lminfinite.models"), (name, home)
            continue
        assert home in CORE, (name, home)
        if inspect.isfunction(obj):
            signature = inspect.signature(obj)
            assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
            untyped = [p for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty]
            assert [p.name for p in untyped] in ([], ["tokenizer"]), (name, untyped)
    assert re.fullmatch(r"\d+\.\d+\.\d+", lminfinite.__version__)


def test_one_registry_of_backends():
    """`BACKENDS` is one list (the config validates against the kernels'), and each name resolves to the
    `attention` function of its own module ("auto" to the chunked torch kernel's)."""
    from lminfinite import config, kernels

    assert config.BACKENDS is kernels.BACKENDS == ("auto", *kernels.KERNEL_MODULES)
    for name, module in kernels.KERNEL_MODULES.items():
        assert kernels.get_kernel(name) is importlib.import_module(f"lminfinite.kernels.{module}").attention
    assert kernels.get_kernel("auto") is kernels.get_kernel(kernels.resolve_backend("auto"))
    with pytest.raises(ValueError, match="backend"):
        lminfinite.LambdaConfig(backend="cuda-magic")


@pytest.mark.parametrize("module", CORE_FILES)
def test_every_core_module_says_what_it_owns(module):
    source = (PACKAGE / f"{module}.py").read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc and len(doc.splitlines()[0].split()) >= 4, f"{module}.py needs a first docstring line"
