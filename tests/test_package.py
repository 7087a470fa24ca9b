"""Package hygiene: public names, one import path each, no framework at import."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import tbc_integrations
from tbc_integrations import TBCError


def public_modules() -> list[str]:
    names = ["tbc_integrations"]
    names.extend(
        info.name
        for info in pkgutil.walk_packages(tbc_integrations.__path__, "tbc_integrations.")
        if not any(part.startswith("_") for part in info.name.split("."))
    )
    return names


def test_every_public_name_has_exactly_one_import_path() -> None:
    owners: dict[str, list[str]] = {}
    for modname in public_modules():
        module = importlib.import_module(modname)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{modname} has no __all__"
        for name in exported:
            assert hasattr(module, name), f"{modname}.__all__ lists missing {name}"
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                owners.setdefault(f"{obj.__module__}.{obj.__qualname__}", []).append(modname)
    doubles = {k: v for k, v in owners.items() if len(v) > 1}
    assert doubles == {}


def test_every_error_derives_from_one_base() -> None:
    errors = [
        obj
        for name in tbc_integrations.__all__
        if inspect.isclass(obj := getattr(tbc_integrations, name))
        and issubclass(obj, BaseException)
    ]
    assert len(errors) >= 8
    assert all(issubclass(e, TBCError) for e in errors)


def test_public_objects_have_docstrings() -> None:
    for modname in public_modules():
        module = importlib.import_module(modname)
        assert module.__doc__, modname
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert obj.__doc__, f"{modname}.{name} has no docstring"


def test_import_works_with_no_framework_installed() -> None:
    code = textwrap.dedent(
        """
        import sys
        for blocked in ("langchain_core", "langchain", "langgraph", "crewai", "redis",
                        "tiktoken", "opentelemetry", "rich", "matplotlib"):
            sys.modules[blocked] = None
        import pkgutil, importlib, tbc_integrations
        plugins = {"tbc_integrations.langchain", "tbc_integrations.langgraph",
                   "tbc_integrations.crewai", "tbc_integrations.testing",
                   "tbc_integrations.telemetry", "tbc_integrations.stores._redis",
                   "tbc_integrations._chat_shaping"}
        for info in pkgutil.walk_packages(tbc_integrations.__path__, "tbc_integrations."):
            if info.name == "tbc_integrations.__main__":
                continue  # running it is the command line
            if info.name in plugins:
                try:
                    importlib.import_module(info.name)
                except tbc_integrations.MissingDependencyError as exc:
                    assert "pip install 'tbc-integrations[" in str(exc), exc
                else:
                    raise AssertionError(f"{info.name} imported without its framework")
            else:
                importlib.import_module(info.name)
        m = tbc_integrations.BudgetManager()
        m.register_agent("a", max_tokens=10)
        with m.spend("a", 2, 3) as call:
            call.set_usage((2, 3))
        print(m.report()["a"]["consumed"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"


ROOT = Path(__file__).resolve().parent.parent


def test_sdist_holds_license_and_everything_its_tests_need(tmp_path: Path) -> None:
    """The sdist's test suite runs: conftest, plugins, and the files the tests load."""
    out = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        member = tar.extractfile(f"{top}/PKG-INFO")
        assert member is not None
        pkg_info = member.read().decode()
    held = {name.split("/", 1)[1] for name in names if "/" in name}

    needed = {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "mkdocs.yml"}
    needed |= {"tests/__init__.py", "tests/conftest.py", "tests/plugins/__init__.py"}
    for folder, pattern in [
        ("tests", "*.py"),
        ("examples", "*"),
        ("benchmarks", "*.py"),
        ("notebooks", "*.ipynb"),
        ("docs", "*"),
    ]:
        needed |= {
            path.relative_to(ROOT).as_posix()
            for path in (ROOT / folder).rglob(pattern)
            if path.is_file() and "__pycache__" not in path.parts
        }
    assert needed - held == set()
    assert not [name for name in held if "__pycache__" in name or name.endswith(".pyc")]
    assert "License-Expression: MIT" in pkg_info
    assert "License-File: LICENSE" in pkg_info
    assert "MIT License" in (ROOT / "LICENSE").read_text()
