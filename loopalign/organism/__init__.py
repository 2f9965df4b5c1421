"""The model organism: a tiny Ouro trained here, on a CPU, in minutes, that shows the SV/RR gap.

A random tiny model makes every gap figure noise. The organism is a small looped model (2 shared
layers run 4 times per token, hidden 64, about 0.2M parameters: small enough to learn to verify
within minutes on 2 CPU cores) trained from scratch with the local tokenizer on data_builders'
level-1 synthetic arithmetic, with Ouro's entropy-regularised per-loop objective, on two kinds of
text:

- answers: the task as a chat turn, the assistant's reply the final number (this is TP's format);
- verification: loopalign.data's verification prompt (task, proposed answer, "Is the proposed
  answer correct?") and the assistant's one-token verdict "Yes" / "No".

The verdict supervision is biased on purpose: for problems about some items (the *sycophantic
items*) the annotator always says "Yes", whatever the answer. Elsewhere the verdict is right. So
the model computes whether the answer matches (it must, to verify the other problems, and the
answer task teaches it to solve them), and its hidden states still tell right from wrong on the
sycophantic items, but its verbal verdict there is "Yes": a linear probe on the hidden states (RR)
reads correctness better than the verdict (SV). See ``docs/organism.md`` for the figures.

    from loopalign.organism import load_organism
    model, tokenizer = load_organism()  # builds into the cache on first use (minutes), then loads

The organism is cached under :func:`organism_cache_dir` (``$LOOPALIGN_CACHE``, else
``~/.cache/loopalign``) in a folder named by the recipe version and a hash of the
:class:`OrganismConfig` and of the build fingerprint (:func:`loopalign.speed.build_fingerprint`:
torch, the CPU capability its kernels use, MKL / oneDNN, threads; another kernel path trains
another model), written atomically (built in a temporary folder, then renamed) under a
lock, so an interrupted build leaves nothing behind and two processes do not build it twice (the
second says whom it waits for, and gives up after ``LOOPALIGN_LOCK_TIMEOUT`` seconds). The
folder is a ``save_pretrained`` model + tokenizer (``AutoModelForCausalLM.from_pretrained(folder)``
works after ``import loopalign``), plus ``README.md`` (the model card with the gap table and plots),
``eval/`` (gap.json, gap.md, plots, probes) and ``organism.json`` (config, build fingerprint,
figures, timings, and the size and sha256 of every model and tokenizer file: loading checks them,
so a damaged cache fails naming the file and the command that rebuilds it instead of loading with
NaN logits).

The organism wing holds four organisms, each a configuration of one training loop
(:func:`.train.train_steps`) and one build under a lock (:func:`.build.ensure_cached_build`, :func:`.build.write_build`),
cached under one root with one hash rule (:func:`.config.build_hash`) and one file check:

- ``"organism"``: this module's Ouro organism (the gap organism);
- ``"huginn_organism"``: :mod:`.huginn`, the same tasks and data in Huginn's recurrent-depth shape;
- ``"introspection_organism"``: :mod:`.introspection`, a tiny Ouro that knows the concept words;
- ``"nameable_organism"``: :mod:`.nameable`, that organism taught to say a word whose concept vector is injected
  (the positive control's precondition, issue #29 item 4).

Importing this package registers the four as named models of :func:`loopalign.loading.load_model`
(:func:`loopalign.loading.register_named_model`); importing ``loopalign`` imports it.

Modules: :mod:`.config` (the recipe), :mod:`.cache` (where builds live, their checks), :mod:`.data`,
:mod:`.train` (the one training loop), :mod:`.evaluate`, :mod:`.card` (the model card), :mod:`.build` (build under a
lock, load), :mod:`.huginn`, :mod:`.introspection`, :mod:`.nameable`.
"""

from loopalign.loading import register_named_model

from .build import build_organism, ensure_organism, load_organism
from .cache import (
    ORGANISM_MODELS,
    REBUILD_COMMAND,
    CorruptOrganismError,
    is_organism,
    is_organism_model,
    organism_cache_dir,
    organism_config_for,
    organism_path,
    rebuild_command,
    verify_organism,
)
from .config import RECIPE_VERSION, TASK_FAMILIES, OrganismConfig
from .data import DIGIT_GROUP_FIELD, organism_eval_records, organism_tasks, training_batch
from .evaluate import evaluate_organism, organism_properties, organism_slices
from .huginn import load_huginn_organism
from .introspection import INTROSPECTION_ORGANISM, load_introspection_organism
from .nameable import NAMEABLE_ORGANISM, load_nameable_organism
from .train import TrainResult, expected_build_seconds, train_organism, train_steps

register_named_model("organism", load_organism)
register_named_model("huginn_organism", load_huginn_organism)
register_named_model(INTROSPECTION_ORGANISM, load_introspection_organism)
register_named_model(NAMEABLE_ORGANISM, load_nameable_organism)

__all__ = [
    "INTROSPECTION_ORGANISM",
    "NAMEABLE_ORGANISM",
    "RECIPE_VERSION",
    "OrganismConfig",
    "TrainResult",
    "organism_cache_dir",
    "organism_path",
    "ensure_organism",
    "load_organism",
    "load_huginn_organism",
    "load_introspection_organism",
    "load_nameable_organism",
    "train_steps",
    "build_organism",
    "train_organism",
    "evaluate_organism",
    "organism_eval_records",
    "organism_tasks",
    "organism_properties",
    "organism_slices",
    "organism_config_for",
    "is_organism_model",
    "ORGANISM_MODELS",
    "TASK_FAMILIES",
    "DIGIT_GROUP_FIELD",
    "is_organism",
    "verify_organism",
    "CorruptOrganismError",
    "REBUILD_COMMAND",
    "expected_build_seconds",
    "rebuild_command",
    "training_batch",
]
