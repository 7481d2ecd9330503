"""Whether this Python holds the named distributions in the ranges ``pyproject.toml`` requires.

    python benchmarks/check_env.py torch timm numpy scipy

``gpu.sh`` runs it first. A lent GPU machine brings its own PyTorch and timm, and reinseg's
modules import timm only when a model is built: a timm outside the range (reinseg reaches into
private timm APIs, ``tests/test_timm_api.py``) would pass an import check and then fail, or
build something else, in every section. Prints one line per distribution; exits 1 naming those
missing or out of range (carry a wheel: DEVELOPERS.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def required_ranges(pyproject: Path = PYPROJECT) -> dict[str, Requirement]:
    """``[project].dependencies`` of ``pyproject``, by canonical distribution name."""
    try:
        import tomllib  # Python >= 3.11; the GPU image has 3.12
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise SystemExit("check_env: reading pyproject.toml needs Python >= 3.11 or tomli") from None
    with pyproject.open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return {canonicalize_name(req.name): req for req in map(Requirement, dependencies)}


def unmet(names: list[str], ranges: dict[str, Requirement]) -> list[str]:
    """Each of ``names`` missing here or outside its range, as a line saying which."""
    problems = []
    for name in names:
        req = ranges.get(canonicalize_name(name))
        if req is None:
            raise SystemExit(f"check_env: {name} is not among pyproject.toml's dependencies")
        try:
            found = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req.name}: not installed (pyproject.toml: {req})")
            continue
        ok = req.specifier.contains(found, prereleases=True)
        print(f"{req.name} {found}: {'in' if ok else 'OUTSIDE'} {req.specifier}")
        if not ok:
            problems.append(f"{req.name} {found} is outside pyproject.toml's {req.specifier}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="distribution names, as pyproject.toml spells them")
    problems = unmet(parser.parse_args().names, required_ranges())
    for line in problems:
        print(line)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
