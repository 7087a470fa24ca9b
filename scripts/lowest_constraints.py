"""Print pip constraints pinning the frameworks to the lowest versions pyproject.toml allows.

CI's "lowest versions" job installs the package with these constraints (``pip install -c``) and
runs the plugin tests, so a lower bound in ``[project.optional-dependencies]`` is a tested
promise and not a guess. Each package below is pinned to the highest of its ``>=`` bounds across
the extras (the lowest version that every extra naming it accepts); a package with no ``>=`` bound
there is an error, not a silent latest.

    python scripts/lowest_constraints.py > constraints.txt                     # every extra
    python scripts/lowest_constraints.py langchain anthropic test > lc.txt     # these extras only

With extras named, only the packages those extras mention are pinned (a job that installs the
``langchain`` extra alone tests it on its own, lower, langchain-core bound).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PACKAGES = (
    "langchain-core",
    "langchain",
    "langchain-openai",
    "langchain-anthropic",
    "langgraph",
    "crewai",
)

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")
_LOWER = re.compile(r">=\s*([0-9][^,\s]*)")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def lower_bounds(pyproject: Path, extras: list[str]) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"no such extra in pyproject.toml: {', '.join(unknown)}")
    requirements = list(project.get("dependencies", []))
    for extra in extras or optional:
        requirements.extend(optional[extra])
    bounds: dict[str, str] = {}
    unbounded: set[str] = set()
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            continue
        name, specifier = _normalise(match.group(1)), match.group(2)
        lower = _LOWER.search(specifier)
        if name not in PACKAGES:
            continue
        if lower is None:
            unbounded.add(name)
            continue
        version = lower.group(1)
        if name not in bounds or _key(version) > _key(bounds[name]):
            bounds[name] = version
    if unbounded:
        names = ", ".join(sorted(unbounded))
        raise SystemExit(f"no '>=' lower bound in pyproject.toml for: {names}")
    return bounds


def main(extras: list[str]) -> int:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    bounds = lower_bounds(pyproject, extras)
    if not bounds:
        print("none of the frameworks is named in those extras", file=sys.stderr)
        return 1
    for name in PACKAGES:
        if name in bounds:
            print(f"{name}=={bounds[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
