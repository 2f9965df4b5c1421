"""[architecture] the injection floor imports nothing above it; the introspection packages import no
data_builders and no first-party name inside a function; moved names stay importable for one release."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOOR_ALLOWED = ("loopalign.io", "loopalign.hooks", "loopalign.models", "loopalign.loops", "loopalign.tokenizer")
PACKAGES = ("loopalign/injection", "loopalign/eval/introspection", "loopalign/trainers/introspection",
            "loopalign/scripts")  # fmt: skip
SHIMS = ("loopalign/eval/judges.py", "loopalign/trainers/introspection_grpo.py", "loopalign/rewards/introspection.py")


def _files(*roots):
    for r in roots:
        p = ROOT / r
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def _imports(path: Path):
    """(module, top_level) of every import in the file; relative imports resolved against its package."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        pkg = ".".join(path.relative_to(ROOT).parts[:-1])
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                yield ".".join([*base, node.module] if node.module else base), id(node) in top
            else:
                yield node.module, id(node) in top


def test_the_injection_floor_imports_only_its_allowed_first_party_modules():
    for path in _files("loopalign/injection"):
        for mod, _ in _imports(path):
            if mod.split(".")[0] in ("loopalign", "data_builders"):
                assert mod.startswith("loopalign.injection") or mod.startswith(FLOOR_ALLOWED), (path.name, mod)


@pytest.mark.parametrize("root", [*PACKAGES, *SHIMS])
def test_no_data_builders_and_no_function_local_first_party_imports(root):
    for path in _files(root):
        for mod, top in _imports(path):
            assert not mod.startswith("data_builders"), (str(path), mod)
            if mod.split(".")[0] == "loopalign":
                assert top, f"{path.relative_to(ROOT)}: function-local import of {mod}"


@pytest.mark.slow
def test_importing_each_package_alone_has_no_import_circle():
    for mod in ("loopalign.injection", "loopalign.eval.introspection", "loopalign.trainers.introspection",
                "loopalign.rewards.introspection", "loopalign.scripts.eval_introspection",
                "loopalign.scripts.grpo_introspection", "data_builders.injection"):  # fmt: skip
        out = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, (mod, out.stderr[-2000:])


def test_moved_names_stay_importable_from_their_old_places():
    import data_builders.injection as old_db
    import loopalign.eval.introspection as ev
    import loopalign.eval.judges as old_judges
    import loopalign.injection as inj
    import loopalign.trainers.introspection as tr
    import loopalign.trainers.introspection_grpo as old_tr
    from loopalign.eval.introspection import judges

    for name in ("CONCEPT_WORDS", "BASELINE_WORDS", "ConceptVectors", "extract_concept_vectors",
                 "load_concept_vectors", "save_concept_vectors", "vectors_hash", "trial_prompt", "concept_prompt_ids",
                 "RESEARCHER_PROMPT", "TRIAL_PROMPT", "CONCEPT_TEMPLATE"):  # fmt: skip
        assert getattr(old_db, name) is getattr(inj, name), name
    for name in ("inject_rows", "trial_vector", "trial_vectors", "residual_site_norms", "transcript_prompt"):
        assert getattr(ev, name) is getattr(inj, name), name
    assert inj.transcript_prompt is inj.trial_prompt  # one transcript function
    assert old_judges.model_judge is judges.model_judge and old_judges.grader_agreement is judges.grader_agreement
    for name in old_tr.__all__:
        assert getattr(old_tr, name) is (getattr(tr, name) if hasattr(tr, name) else getattr(inj, name)), name
    # one chat renderer: the old private copies are gone
    assert not hasattr(ev, "_chat") and not hasattr(old_db, "_chat")
