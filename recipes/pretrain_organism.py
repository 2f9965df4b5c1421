"""Build the model organism: a tiny Ouro trained from scratch on a CPU that shows the SV/RR gap.

    python recipes/pretrain_organism.py                  # build into the cache (or reuse it) and print its card
    python recipes/pretrain_organism.py --force          # rebuild the cached organism
    python recipes/pretrain_organism.py --out DIR --seed 1 --steps 300   # another organism, in DIR

The cache is ``$LOOPALIGN_CACHE`` (default ``~/.cache/loopalign``); the organism's folder is named by
the recipe version and a hash of its settings. Other recipes (``eval_gap.py``, ``sft_gap.py``) build
it on first use. The folder loads with ``loopalign.organism.load_organism()`` or, after
``import loopalign``, with ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from loopalign.organism import (
    OrganismConfig,
    build_organism,
    ensure_organism,
    is_organism,
    organism_cache_dir,
    organism_path,
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default: the organism's folder in the cache)")
    ap.add_argument("--cache-dir", default=None, help=f"cache root (default {organism_cache_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even when a complete organism is there")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(OrganismConfig):
        if f.name == "recipe_version":
            continue
        default = f.default
        if isinstance(default, tuple):
            kind = int if all(isinstance(x, int) for x in default) else str
            ap.add_argument(
                f"--{f.name.replace('_', '-')}", type=kind, nargs="*", default=None, help=f"default {default}"
            )
        else:
            ap.add_argument(
                f"--{f.name.replace('_', '-')}", type=type(default), default=None, help=f"default {default}"
            )
    args = ap.parse_args(argv)

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(OrganismConfig) if hasattr(args, f.name)}
    config = OrganismConfig(**{k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    if args.out is not None:
        if is_organism(args.out, config) and not args.force:
            path = args.out
            print(f"reusing the organism in {path} (--force rebuilds it)")
        else:
            path = build_organism(config, args.out, progress=not args.no_progress)
    else:
        path = organism_path(config, args.cache_dir)
        if args.force and is_organism(path, config):
            build_organism(config, path, progress=not args.no_progress)
        else:
            existed = is_organism(path, config)
            path = ensure_organism(config, args.cache_dir, progress=not args.no_progress)
            if existed:
                print(f"reusing the cached organism in {path} (--force rebuilds it)")
    with open(f"{path}/organism.json") as f:
        meta = json.load(f)
    print(open(f"{path}/README.md").read().split("<details>")[0])
    print(
        f"organism: {path}\ntraining {meta['train_seconds']:.0f} s, build {meta['build_seconds']:.0f} s "
        f"(this run: {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
