"""The injection build: the trials (:class:`TrialConfig`, :func:`build_trials`) and the build folder
(:func:`build_injection`: concept vectors saved beside the ``trials/`` build, written atomically; :func:`load_injection`).
Its command (``loopalign build-injection``, also ``python -m data_builders.injection``) is
:mod:`loopalign.scripts.build_injection`. The build folder's file names and checks are in
:mod:`loopalign.injection.builds`."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from loopalign.data.io import load_build, save_build, swap_into_place
from loopalign.data.schema import validate_trial
from loopalign.errors import ConfigError
from loopalign.io import make_temp_dir

from .builds import VECTORS_FILE
from .prompts import trial_prompt
from .vectors import ConceptVectors, extract_concept_vectors, load_concept_vectors, save_concept_vectors, vectors_hash
from .words import CONCEPT_WORDS

__all__ = ["TrialConfig", "build_injection", "build_trials", "check_injection_options", "load_injection"]


@dataclass
class TrialConfig:
    """Which trials to build. Loops/layers are 0-based; ``num_loops`` is the loops the model runs.

    Defaults: all extraction and injection loops, strengths (1, 2, 4, 8), ``n_controls`` no-injection trials.
    """

    num_loops: int
    layers: tuple[int, ...]
    concepts: tuple[str, ...] = CONCEPT_WORDS
    extraction_loops: tuple[int, ...] | None = None
    injection_loops: tuple[int, ...] | None = None
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    n_controls: int = 50

    def __post_init__(self):
        if self.num_loops < 1:
            raise ConfigError(f"TrialConfig.num_loops must be >= 1, got {self.num_loops}")
        every = tuple(range(self.num_loops))
        self.extraction_loops = every if self.extraction_loops is None else tuple(self.extraction_loops)
        self.injection_loops = every if self.injection_loops is None else tuple(self.injection_loops)
        for name in ("extraction_loops", "injection_loops"):
            bad = [t for t in getattr(self, name) if not 0 <= t < self.num_loops]
            if bad:
                raise ConfigError(f"TrialConfig.{name} {bad} out of range 0..{self.num_loops - 1} (0-based)")
        self.layers, self.concepts = tuple(self.layers), tuple(self.concepts)
        self.strengths = tuple(float(s) for s in self.strengths)
        if not self.layers or any(x < 0 for x in self.layers):
            raise ConfigError(f"TrialConfig.layers must be non-empty 0-based indices, got {self.layers}")
        if any(s <= 0 for s in self.strengths):
            raise ConfigError(f"TrialConfig.strengths must be > 0, got {self.strengths}")
        if self.n_controls < 0:
            raise ConfigError("TrialConfig.n_controls must be >= 0")


def build_trials(tokenizer, config: TrialConfig, vectors: ConceptVectors | None = None) -> list[dict]:
    """Trial records: one injection trial per (concept, extraction_loop, injection_loop, layer, strength),
    then ``n_controls`` control trials. With ``vectors``, every site is checked against the extracted ones."""
    if vectors is not None:
        for t in config.extraction_loops:
            for layer in config.layers:
                vectors.select(t, layer)  # raises on out-of-range
        missing = [c for c in config.concepts if c not in vectors.vectors]
        if missing:
            raise ValueError(f"no concept vectors for {missing[:5]}")
    prompt, ids, start = trial_prompt(tokenizer)
    common = {"prompt": prompt, "input_ids": ids, "injection_start": start, "num_loops": config.num_loops}
    rows = []
    for concept in config.concepts:
        for te in config.extraction_loops:
            for ti in config.injection_loops:
                for layer in config.layers:
                    for s in config.strengths:
                        rows.append(
                            {
                                "id": f"inj-{concept}-e{te}-i{ti}-l{layer}-s{s:g}",
                                "concept": concept,
                                "extraction_loop": te,
                                "injection_loop": ti,
                                "layer": layer,
                                "strength": s,
                                "injected": True,
                                "trial_type": "injection",
                                **common,
                            }
                        )
    for k in range(config.n_controls):
        rows.append(
            {
                "id": f"control-{k}",
                "concept": "",
                "extraction_loop": -1,
                "injection_loop": -1,
                "layer": -1,
                "strength": 0.0,
                "injected": False,
                "trial_type": "control",
                **common,
            }
        )
    for r in rows:
        validate_trial(r)
    return rows


def _check_count(option: str, value, low: int, high: int | None = None, default: str = "") -> None:
    """None (the default) or an int in low..high; else a ValueError naming the option."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{option} must be {span}{f' ({default})' if default else ''}, got {value}")


def check_injection_options(num_loops=None, n_concepts=None, n_controls=50, batch_size=16, strengths=(1.0,)) -> None:
    """Reject option values that would silently mean something else (``--loops 0`` is not "the default")."""
    _check_count("--loops", num_loops, 1, default="leave it out for the model's config.total_ut_steps")
    _check_count("--n-concepts", n_concepts, 1, len(CONCEPT_WORDS), f"leave it out for all {len(CONCEPT_WORDS)}")
    _check_count("--n-controls", n_controls, 0)
    _check_count("--batch-size", batch_size, 1)
    if not strengths or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in strengths):
        raise ValueError(f"--strengths must be one or more numbers > 0, got {strengths!r}")


def load_injection(out: str | os.PathLike):
    """An injection build folder -> (ConceptVectors, trials Dataset, trials metadata), checked: the
    trial rows and content hash, and the vectors against the trials' ``vectors_hash``."""
    ds, meta = load_build(Path(out) / "trials")
    return load_concept_vectors(Path(out) / meta.get("vectors", VECTORS_FILE)), ds, meta


_BUILD_ITEMS = {VECTORS_FILE, "trials"}


def build_injection(
    model,
    tokenizer,
    out: str | os.PathLike,
    num_loops: int | None = None,
    layers: tuple[int, ...] | None = None,
    extraction_loops: tuple[int, ...] | None = None,
    injection_loops: tuple[int, ...] | None = None,
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0),
    n_controls: int = 50,
    n_concepts: int | None = None,
    batch_size: int = 16,
    model_name: str = "",
    overwrite: bool = False,
    command: str | None = None,
) -> dict:
    """Extract concept vectors and build trials into ``out``: ``concept_vectors.safetensors`` + ``trials/`` build.

    The whole build is written into a temporary sibling folder, checked (trial rows, content hash,
    vectors against ``vectors_hash``) and only then swapped in for ``out``: a failed rebuild
    (``overwrite``) leaves the old vectors and trials together. ``num_loops`` / ``n_concepts`` None
    mean the defaults (config.total_ut_steps, all 50 words); 0 or less is an error.
    ``command``: the CLI command without ``--out`` (stored in the metadata; with ``--out``, named when the
    vectors beside the trials do not match).
    Returns the trials' build metadata (with ``content_hash`` and ``vectors_hash``).
    """
    strengths = tuple(strengths)
    check_injection_options(num_loops, n_concepts, n_controls, batch_size, strengths)
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _BUILD_ITEMS)
        if foreign:
            raise FileExistsError(
                f"{out} holds files that are not an injection build ({foreign[:3]}); pick a new or empty folder"
            )
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} holds an injection build; pass --overwrite to replace it")
    concepts = CONCEPT_WORDS if n_concepts is None else CONCEPT_WORDS[:n_concepts]
    num_loops = int(getattr(model.config, "total_ut_steps", 1) if num_loops is None else num_loops)
    # check the trial grid before the (slow) extraction
    grid_layers = tuple(layers) if layers is not None else tuple(range(model.config.num_hidden_layers))
    TrialConfig(num_loops, grid_layers, concepts, extraction_loops, injection_loops, strengths, n_controls)
    cv = extract_concept_vectors(
        model, tokenizer, concepts, num_loops=num_loops, layers=layers, batch_size=batch_size, model_name=model_name
    )
    cfg = TrialConfig(num_loops, tuple(cv.layers), concepts, extraction_loops, injection_loops, strengths, n_controls)
    trials = build_trials(tokenizer, cfg, cv)
    meta = {
        "builder": "data_builders.injection",
        "vectors": VECTORS_FILE,
        "vectors_hash": vectors_hash(cv),
        "vector_metadata": cv.metadata,
        "settings": {
            "num_loops": num_loops,
            "layers": list(cv.layers),
            "extraction_loops": list(cfg.extraction_loops),
            "injection_loops": list(cfg.injection_loops),
            "strengths": list(cfg.strengths),
            "n_controls": n_controls,
            "n_concepts": len(concepts),
        },
    }
    if command:
        meta["command"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_concept_vectors(cv, tmp / VECTORS_FILE)
        result = save_build(trials, tmp / "trials", "trial", meta)
        load_build(tmp / "trials")  # complete and valid: rows, content hash, vectors against vectors_hash
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
