"""Build the model organism: a tiny Ouro trained from scratch on a CPU that shows the SV/RR gap.

    python recipes/pretrain_organism.py                   # build into the cache (or reuse it) and print its card
    loopalign organism --force                            # rebuild the cached organism
    loopalign organism --output_dir DIR --seed 1 --steps 300   # another organism, in DIR
    loopalign organism --config organism.yaml             # OrganismConfig fields from YAML, options override
    loopalign organism --family huginn                    # the Huginn-shaped organism (same tasks and data)

Every ``OrganismConfig`` field is an option of the same name (its default and meaning are the
library's). The cache is ``$LOOPALIGN_CACHE`` (default ``~/.cache/loopalign``); the organism's
folder is named by the recipe version and a hash of its settings. Other recipes (``eval_gap``,
``sft_gap``) build it on first use. The folder loads with ``loopalign.organism.load_organism()`` or,
after ``import loopalign``, with ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import time
from dataclasses import dataclass, field

from loopalign.errors import ConfigError
from loopalign.log import command_console
from loopalign.organism import (
    OrganismConfig,
    build_organism,
    ensure_organism,
    is_organism,
    organism_path,
)
from loopalign.organism.huginn import (
    build_huginn_organism,
    ensure_huginn_organism,
    huginn_organism_path,
    is_huginn_organism,
)
from loopalign.scripts.args import make_parser, parse_or_exit

#: the organism families this script builds
FAMILIES = ("ouro", "huginn")


def _is_ouro_organism(path, config) -> bool:
    return is_organism(path, config) and not is_huginn_organism(path, config)


def _field_comments(cls) -> dict[str, str]:
    """``name: type = default  # comment`` lines of a dataclass's source -> {name: comment}."""
    found = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            found.setdefault(m.group(1), m.group(2).strip().replace("%", "%%"))  # argparse formats help with %
    return found


def _organism_arguments() -> type:
    """``OrganismConfig``'s fields as parser options (tuples become lists; ``recipe_version`` is not an
    option): the library's names, defaults and comments, not a copy of them."""
    defaults, comments, specs = OrganismConfig(), _field_comments(OrganismConfig), []
    for f in dataclasses.fields(OrganismConfig):
        if f.name == "recipe_version":
            continue
        value = getattr(defaults, f.name)
        help = comments.get(f.name, f"OrganismConfig.{f.name}")
        if isinstance(value, tuple):
            kind = int if all(isinstance(x, int) for x in value) else str
            spec = field(default_factory=lambda v=value: list(v), metadata={"help": help})
            specs.append((f.name, list[kind], spec))
        else:
            specs.append((f.name, type(value), field(default=value, metadata={"help": help})))

    def organism_config(self) -> OrganismConfig:
        return OrganismConfig(**{name: getattr(self, name) for name, _, _ in specs})

    def __post_init__(self):
        self.organism_config()  # OrganismConfig validates, naming the field

    cls = dataclasses.make_dataclass(
        "OrganismArguments", specs, namespace={"organism_config": organism_config, "__post_init__": __post_init__}
    )
    cls.__module__ = __name__
    cls.__doc__ = "The organism's settings: every OrganismConfig field but recipe_version."
    return cls


OrganismArguments = _organism_arguments()


@dataclass
class PretrainOrganismScriptArguments:
    """Where the organism goes and whether it is rebuilt."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Output folder (default: the organism's folder in the cache)."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache root (default: $LOOPALIGN_CACHE when set, else ~/.cache/loopalign)."}
    )
    force: bool = field(default=False, metadata={"help": "Rebuild even when a complete organism is there."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (--no_progress: none)."})
    family: str = field(
        default="ouro",
        metadata={
            "help": "The organism's architecture: 'ouro' (shared layers looped, exit gate) or 'huginn' (prelude / "
            "recurrent block / coda, loopalign.organism.huginn); the same tasks, data and evaluation."
        },
    )

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")


def build(script_args: PretrainOrganismScriptArguments, config: OrganismConfig) -> str:
    """Build (or reuse) the organism; print its card. -> its folder."""
    start = time.perf_counter()
    huginn = script_args.family == "huginn"
    if script_args.output_dir is not None:
        path = script_args.output_dir
        if (is_huginn_organism if huginn else _is_ouro_organism)(path, config) and not script_args.force:
            print(f"reusing the organism in {path} (--force rebuilds it)")
        else:
            path = (build_huginn_organism if huginn else build_organism)(config, path, progress=script_args.progress)
    elif not huginn:  # the cache, built under its lock
        path = organism_path(config, script_args.cache_dir)
        if script_args.force and is_organism(path, config):
            build_organism(config, path, progress=script_args.progress)
        else:
            existed = is_organism(path, config)
            path = ensure_organism(config, script_args.cache_dir, progress=script_args.progress)
            if existed:
                print(f"reusing the cached organism in {path} (--force rebuilds it)")
    else:
        existed = is_huginn_organism(huginn_organism_path(config, script_args.cache_dir), config)
        existed = existed and not script_args.force
        path = ensure_huginn_organism(
            config, script_args.cache_dir, force=script_args.force, progress=script_args.progress
        )
        if existed:
            print(f"reusing the cached organism in {path} (--force rebuilds it)")
    with open(f"{path}/organism.json") as f:
        meta = json.load(f)
    with open(f"{path}/README.md") as f:
        print(f.read().split("<details>")[0])
    print(
        f"organism: {path}\ntraining {meta['train_seconds']:.0f} s, build {meta['build_seconds']:.0f} s "
        f"(this run: {time.perf_counter() - start:.0f} s)"
    )
    return str(path)


def build_parser(argv: list[str] | None = None):
    """The script's ``TrlParser`` (PretrainOrganismScriptArguments, OrganismArguments; YAML with ``--config``)."""
    return make_parser((PretrainOrganismScriptArguments, OrganismArguments), __doc__)


def main(argv: list[str] | None = None) -> int:
    """``recipes/pretrain_organism.py`` / ``loopalign organism``: parse ``argv`` (default ``sys.argv[1:]``), build."""
    command_console()
    argv = sys.argv[1:] if argv is None else argv
    script_args, organism_args = parse_or_exit(build_parser(argv), argv)
    build(script_args, organism_args.organism_config())
    return 0
