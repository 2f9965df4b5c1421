"""Per-row injection mechanics: the vector a trial injects and the hooks that add it, row by row.

A trial row names a site (``extraction_loop``, ``injection_loop``, ``layer``) and a ``strength``;
:func:`trial_vector` turns it into the [H] vector added to the residual stream, :func:`inject_rows`
adds row ``b``'s vector after ``layers[b]`` in ``loops[b]`` from column ``starts[b]`` to the end of
the sequence (generated tokens included). Evaluation (generation) and the trainers (rollouts, the
log-prob recomputations and the SFT forward) use the same two functions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from loopalign.hooks import add_vector, capture_activations
from loopalign.models.contract import loop_generate_kwargs

__all__ = [
    "TRIAL_TYPES",
    "SITE_COLUMNS",
    "trial_vector",
    "trial_vectors",
    "residual_site_norms",
    "inject_rows",
    "injection_spec",
]

#: injection: a concept vector; control: nothing; random: a random direction norm-matched to the concept
#: vectors at the site; control_question: a yes/no question whose true answer is "no"
TRIAL_TYPES = ("injection", "control", "random", "control_question")


def trial_vector(trial: dict, vectors, hidden_size: int, site_norm: float | None = None) -> torch.Tensor:
    """strength x vector [H] (float32) a trial injects; zeros for controls. With ``site_norm`` (norm-matched
    injection) the vector's direction is scaled to strength x ``site_norm``, the residual-stream norm at the
    injection site, so a strength means the same perturbation at every (loop, layer) whatever the
    vector's own norm (which grows about 5x over the loops of a tiny model)."""
    kind = trial.get("trial_type", "injection")
    if kind not in TRIAL_TYPES:
        raise ValueError(f"trial {trial.get('id')!r}: unknown trial_type {kind!r}; one of {TRIAL_TYPES}")
    if kind == "control" or not trial.get("injected", kind != "control"):
        return torch.zeros(hidden_size)
    te, layer, s = int(trial["extraction_loop"]), int(trial["layer"]), float(trial["strength"])
    if kind == "random":
        ref = torch.stack(list(vectors.select(te, layer).values())).float().norm(dim=-1).mean()
        g = torch.Generator().manual_seed(int(trial.get("vector_seed", 0)))
        d = torch.randn(hidden_size, generator=g)
        return s * (site_norm if site_norm is not None else ref) * d / d.norm()
    concept = trial.get("concept")
    if not concept:
        raise ValueError(f"trial {trial.get('id')!r}: an injected {kind} trial needs a concept")
    try:
        v = vectors.vector(concept, te, layer).float()
    except KeyError:
        raise ValueError(
            f"trial {trial.get('id')!r}: no concept vector for {concept!r}; available: {sorted(vectors.vectors)[:10]}"
        ) from None
    if v.shape[-1] != hidden_size:
        raise ValueError(f"concept vector has size {v.shape[-1]}, the model's hidden size is {hidden_size}")
    if site_norm is not None:
        return s * site_norm * v / v.norm().clamp_min(1e-12)
    return s * v


def _site_key(trial: dict) -> tuple[int, int, int]:
    return int(trial["num_loops"]), int(trial["injection_loop"]), int(trial["layer"])


def _injected(trial: dict) -> bool:
    return trial.get("trial_type") != "control" and bool(trial.get("injected", True))


#: the columns a trial's norm-matching site key is read from (:func:`residual_site_norms`' keys)
SITE_COLUMNS = ("num_loops", "injection_loop", "layer")


def _site_norm(trial: dict, site_norms: dict | None, index: int) -> float | None:
    """The residual-stream norm at an injected trial's site (None without ``site_norms`` or for a trial that injects
    nothing); a ValueError naming the trial (its ``id``, else its place ``index`` in the batch) and the site when the
    trial lacks a site column or ``site_norms`` has no norm for its site."""
    if site_norms is None or not _injected(trial):
        return None
    name = f"trial {trial['id']!r}" if trial.get("id") is not None else f"row {index}"
    name += f" ({trial.get('trial_type') or 'injection'}, concept {trial.get('concept')!r})"
    missing = [c for c in SITE_COLUMNS if trial.get(c) is None]
    if missing:
        raise ValueError(
            f"{name}: norm-matched injection needs the site columns {list(SITE_COLUMNS)}; missing {missing}"
        )
    key = _site_key(trial)
    if key not in site_norms:
        raise ValueError(
            f"{name}: no residual-stream norm for its site (num_loops, injection_loop, layer) = {key}; "
            f"norms were measured at {sorted(site_norms)}"
        )
    return float(site_norms[key])


def trial_vectors(trials: Sequence[dict], vectors, hidden_size: int, site_norms: dict | None = None) -> torch.Tensor:
    """[B,H] strength-scaled vectors for a batch of trials (zero rows for controls); ``site_norms``
    ((num_loops, injection loop, layer) -> norm, :func:`residual_site_norms`) makes them norm-matched
    (each injected trial then needs the :data:`SITE_COLUMNS`; a missing column or norm is a ValueError naming it)."""
    out = [trial_vector(t, vectors, hidden_size, _site_norm(t, site_norms, i)) for i, t in enumerate(trials)]
    return torch.stack(out)


@torch.no_grad()
def residual_site_norms(model, trials: Sequence[dict]) -> dict[tuple[int, int, int], float]:
    """Mean L2 norm of the residual stream at each trial's injection site ((num_loops, loop, layer)),
    over the uninjected transcript from the injection start to its end (one forward per distinct
    prompt and loop count). -> {(num_loops, injection loop, layer): norm}."""
    device = next(model.parameters()).device
    wanted: dict[tuple[int, tuple[int, ...]], set[tuple[int, int]]] = defaultdict(set)
    starts: dict[tuple[int, ...], int] = {}
    for t in trials:
        if not _injected(t):
            continue
        ids = tuple(int(x) for x in t["input_ids"])
        wanted[(int(t["num_loops"]), ids)].add((int(t["injection_loop"]), int(t["layer"])))
        starts[ids] = int(t["injection_start"])
    sums: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    was_training = model.training
    model.eval()
    try:
        for (n, ids), sites in wanted.items():
            with capture_activations(model, sorted(sites)) as cap:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False, **loop_generate_kwargs(model, n))
            for loop, layer in sites:
                h = cap.get(loop, layer)[0, starts[ids] :].float()
                sums[(n, loop, layer)].append(float(h.norm(dim=-1).mean()))
    finally:
        model.train(was_training)
    return {k: sum(v) / len(v) for k, v in sums.items()}


@contextmanager
def inject_rows(
    model, vectors: torch.Tensor, loops, layers, starts, num_loops: int | None = None, ends=None
) -> Iterator[list]:
    """Per-row injection: row b gets ``vectors[b]`` (already scaled) after ``layers[b]`` in ``loops[b]`` from column
    ``starts[b]`` to the end (generated tokens included), or to ``ends[b]`` (exclusive) when ``ends`` is given.
    Rows with loop < 0 or a zero vector get nothing. One :func:`loopalign.hooks.add_vector` per distinct
    (loop, layer), other rows zeroed."""
    vectors = torch.as_tensor(vectors).float()
    loops = torch.as_tensor(loops).long().view(-1)
    layers = torch.as_tensor(layers).long().view(-1)
    starts = torch.as_tensor(starts).long().view(-1).clamp(min=0)
    if not (vectors.dim() == 2 and vectors.shape[0] == loops.numel() == layers.numel() == starts.numel()):
        raise ValueError(
            f"inject_rows: vectors [B,H] and one loop/layer/start per row needed, got {list(vectors.shape)}, "
            f"{loops.numel()}, {layers.numel()}, {starts.numel()}"
        )
    if ends is not None:
        ends = torch.as_tensor(ends).long().view(-1)
        if ends.numel() != starts.numel():
            raise ValueError(f"inject_rows: one end per row needed, got {ends.numel()} for {starts.numel()} rows")
    active = (loops >= 0) & (vectors.abs().sum(-1) > 0)
    if num_loops is not None and bool((loops[active] >= num_loops).any()):
        bad = sorted(set(loops[active & (loops >= num_loops)].tolist()))
        raise ValueError(f"injection loop(s) {bad} out of range: the model runs {num_loops} loops (0-based)")
    sites = sorted({(int(t), int(j)) for t, j in zip(loops[active].tolist(), layers[active].tolist())})
    records = []
    with ExitStack() as stack:
        for t, j in sites:
            mask = (active & (loops == t) & (layers == j)).float().unsqueeze(-1)
            records.append(
                stack.enter_context(add_vector(model, vectors * mask, loop=t, layer=j, start=starts, end=ends))
            )
        yield records


def injection_spec(
    rows: Sequence[dict], vectors, hidden_size: int, site_norms: dict | None = None
) -> dict[str, torch.Tensor]:
    """Tensors a trainer needs to inject a batch of dataset rows (spec columns ``trial_type``/``injected``,
    ``concept``, ``extraction_loop``, ``injection_loop``, ``layer``, ``strength``, ``injection_start``,
    ``prompt_length``): ``injection_vector`` [B,H], ``injection_loop`` / ``injection_layer`` [B] (-1 on
    controls), ``injection_from_end`` [B] (prompt tokens from the injection start to the prompt's end) and
    ``prompt_length`` [B]. With ``site_norms`` ({(num_loops, injection loop, layer): norm},
    :func:`residual_site_norms`) the vectors are norm-matched as the evaluation's (:func:`trial_vectors`): a
    strength is a fraction of the residual-stream norm at the row's site, and each injected row needs the
    :data:`SITE_COLUMNS` (``num_loops`` included)."""
    vec = trial_vectors(rows, vectors, hidden_size, site_norms)
    control = [(r.get("trial_type") or ("injection" if r.get("injected") else "control")) == "control" for r in rows]
    return {
        "injection_vector": vec,
        "injection_loop": torch.tensor([-1 if c else int(r["injection_loop"]) for r, c in zip(rows, control)]),
        "injection_layer": torch.tensor([-1 if c else int(r["layer"]) for r, c in zip(rows, control)]),
        "injection_from_end": torch.tensor([int(r["prompt_length"]) - int(r["injection_start"]) for r in rows]),
        "prompt_length": torch.tensor([int(r["prompt_length"]) for r in rows]),
    }
