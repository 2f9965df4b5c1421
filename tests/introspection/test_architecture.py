"""[architecture] the introspection packages import alone (a fresh interpreter each), and moved names stay
importable (data_builders.injection, the build's command). Floors, circles and function-local imports of the whole package: tests/test_layering.py."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


_IMPORT_EACH_ALONE = """
import importlib
import sys

import peft, torch, transformers, trl  # noqa: E401,F401  third-party modules stay loaded: a circle is loopalign's own

for mod in sys.argv[1:]:
    for name in [n for n in sys.modules if n.split(".")[0] in ("loopalign", "data_builders")]:
        del sys.modules[name]
    importlib.import_module(mod)  # imported first: no module of loopalign or data_builders is loaded yet
    print("imported", mod)
"""


@pytest.mark.slow
def test_importing_each_package_alone_has_no_import_circle():
    # the packages below the scripts, each imported first with none of loopalign's modules loaded (one interpreter:
    # loopalign's and data_builders' modules are dropped from sys.modules between them, the third-party ones kept;
    # the scripts sit on the top floor, which nothing imports; tests/test_layering.py checks the whole import graph
    # for circles statically)
    mods = ["loopalign.injection", "loopalign.eval.introspection", "loopalign.trainers.introspection",
            "loopalign.rewards.introspection", "data_builders.injection"]  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, *mods], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("imported ")] == [f"imported {m}" for m in mods]


def test_moved_names_stay_importable_from_their_old_places():
    import data_builders.injection as old_db
    import loopalign.eval.introspection as ev
    import loopalign.injection as inj

    for name in ("CONCEPT_WORDS", "BASELINE_WORDS", "ConceptVectors", "extract_concept_vectors",
                 "load_concept_vectors", "save_concept_vectors", "vectors_hash", "trial_prompt", "concept_prompt_ids",
                 "RESEARCHER_PROMPT", "TRIAL_PROMPT", "CONCEPT_TEMPLATE"):  # fmt: skip
        assert getattr(old_db, name) is getattr(inj, name), name
    for name in ("inject_rows", "trial_vector", "trial_vectors", "residual_site_norms", "transcript_prompt"):
        assert getattr(ev, name) is getattr(inj, name), name
    assert inj.transcript_prompt is inj.trial_prompt  # one transcript function
    # one chat renderer: the old private copies are gone
    assert not hasattr(ev, "_chat") and not hasattr(old_db, "_chat")
