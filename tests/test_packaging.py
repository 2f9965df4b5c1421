"""The version bounds: pyproject's lower bounds are what CI's lowest leg installs (.ci/lowest.txt),
and constraints.txt (the set CI last passed with) satisfies pyproject's ranges."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


#: optional extras whose packages CI tests at both ends too (the dev extra installs them)
TESTED_EXTRAS = ("deepspeed", "statements")


def _requirements() -> dict[str, Requirement]:
    """The core dependencies and those of :data:`TESTED_EXTRAS`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in TESTED_EXTRAS for r in project["optional-dependencies"][extra]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_the_dev_install_brings_the_tested_extras():
    """The README installs ``.[dev]``; CI runs exactly that, so the extras it tests come with dev."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = {canonicalize_name(Requirement(r).name): Requirement(r) for r in extras["dev"]}
    for extra in TESTED_EXTRAS:
        for r in map(Requirement, extras[extra]):
            assert canonicalize_name(r.name) in dev, f"the dev extra lacks {r.name} (of the {extra} extra)"
            assert dev[canonicalize_name(r.name)].specifier == r.specifier, (r, dev[canonicalize_name(r.name)])


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"{path.name}: not a 'name==version' pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _lower_bound(req: Requirement) -> str:
    lows = [s.version for s in req.specifier if s.operator == ">="]
    assert len(lows) == 1, f"{req}: every core dependency needs one tested lower bound (>=)"
    return lows[0]


def test_every_dependency_has_a_lower_bound_and_the_lowest_leg_pins_it():
    reqs = _requirements()
    lowest = _pins(ROOT / ".ci" / "lowest.txt")
    for name, req in reqs.items():
        low = _lower_bound(req)
        if name == "torch":  # CI installs the CPU build first, in both legs
            continue
        assert name in lowest, f".ci/lowest.txt does not pin {name} (pyproject: {req})"
        assert req.specifier.contains(lowest[name], prereleases=True), (name, lowest[name], str(req))
        assert lowest[name].split(".")[: len(low.split("."))] == low.split("."), (
            f"{name}: .ci/lowest.txt pins {lowest[name]} but pyproject's lower bound is {low}"
        )
    assert set(lowest) <= set(reqs), f".ci/lowest.txt pins packages pyproject does not name: {set(lowest) - set(reqs)}"


def test_fast_moving_apis_have_upper_bounds():
    reqs = _requirements()
    for name in ("transformers", "trl", "torch"):
        assert any(s.operator == "<" for s in reqs[name].specifier), f"{name} needs an upper bound"


def test_the_constraints_file_satisfies_pyproject():
    pins = _pins(ROOT / "constraints.txt")
    for name, req in _requirements().items():
        assert name in pins, f"constraints.txt lacks {name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_submodules_work_after_a_plain_import_as_the_readme_writes_them():
    """`import loopalign` then `loopalign.tokenizer.local_tokenizer()` (a fresh interpreter, so no
    other test has imported the submodule first)."""
    import subprocess
    import sys

    code = (
        "import loopalign\n"
        "tok = loopalign.tokenizer.local_tokenizer()\n"
        "assert loopalign.organism.RECIPE_VERSION >= 2 and len(tok) > 300\n"
        "try:\n    loopalign.no_such_module\nexcept AttributeError as e:\n    print('ok', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok module 'loopalign' has no attribute 'no_such_module'" in done.stdout, (
        done.stderr[-2000:]
    )
