"""Concept vectors per (loop, layer): the type, extraction, files, hashes and norms.

Concept vector of a word at site (t, l): the residual stream after decoder layer ``l`` in loop ``t``
at the last token of the chat-formatted user turn ``Tell me about {word}`` (word lower-cased, with
the generation prompt, so the last token is where the assistant turn begins), minus the mean of
the same activation over the baseline words. Stored per word as a [T, L, H] tensor (T = loops run,
L = the layers extracted, in ``metadata["layers"]`` order).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loopalign.batching import pad_left, pad_token_id
from loopalign.hooks import capture_activations
from loopalign.io import apply_umask
from loopalign.models.contract import is_looped, loop_generate_kwargs, num_hidden_layers, trained_loops

from .prompts import concept_prompt_ids
from .words import BASELINE_WORDS, CONCEPT_TEMPLATE, CONCEPT_WORDS

__all__ = [
    "FORMAT_VERSION",
    "ConceptVectors",
    "extract_concept_vectors",
    "save_concept_vectors",
    "load_concept_vectors",
    "load_vectors",
    "vectors_hash",
    "vector_norms",
    "default_vector_layer",
    "concept_vectors_for",
]

FORMAT_VERSION = "1"


@dataclass
class ConceptVectors:
    """Concept vectors ``vectors[word]`` [T, L, H] and ``metadata`` (model, num_loops, layers, template, hidden_size)."""

    vectors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return list(self.metadata["layers"])

    @property
    def num_loops(self) -> int:
        return int(self.metadata["num_loops"])

    def _layer_pos(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not extracted; available layers (0-based): {self.layers}")
        return self.layers.index(layer)

    def _check_loop(self, loop: int) -> None:
        if isinstance(loop, bool) or not isinstance(loop, int) or not 0 <= loop < self.num_loops:
            raise ValueError(
                f"extraction loop {loop!r} out of range: vectors cover loops 0..{self.num_loops - 1} (0-based)"
            )

    def select(self, extraction_loop: int, layer: int) -> dict[str, torch.Tensor]:
        """``{word: [H]}`` at (extraction_loop, layer); a clear ValueError when either is out of range."""
        self._check_loop(extraction_loop)
        j = self._layer_pos(layer)
        return {w: v[extraction_loop, j] for w, v in self.vectors.items()}

    def vector(self, word: str, extraction_loop: int, layer: int) -> torch.Tensor:
        """[H] for one word (KeyError naming the known words if absent)."""
        if word not in self.vectors:
            raise KeyError(f"no concept vector for {word!r}; words: {sorted(self.vectors)[:10]}...")
        self._check_loop(extraction_loop)
        return self.vectors[word][extraction_loop, self._layer_pos(layer)]


def _last_token_states(model, tokenizer, words, num_loops, layers, batch_size, template) -> torch.Tensor:
    """[N, T, L, H] residuals at the last prompt token for each word (left-padded batches), read by forward hooks
    after each decoder layer in each loop, so any family works (a plain causal LM: T = 1)."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    sites = [(t, j) for t in range(num_loops) for j in layers]
    out = []
    for start in range(0, len(words), batch_size):
        seqs = [concept_prompt_ids(tokenizer, w, template) for w in words[start : start + batch_size]]
        enc = pad_left(seqs, pad)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        kwargs = loop_generate_kwargs(model, num_loops)
        if not is_looped(model):  # left padding: count positions from each row's first real token, as generate does
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with capture_activations(model, sites, positions=[ids.shape[1] - 1]) as cap:
            model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        per = torch.stack([torch.stack([cap.get(t, j)[:, 0] for j in layers], dim=1) for t in range(num_loops)], dim=1)
        out.append(per.float().cpu())
    return torch.cat(out, dim=0)


@torch.no_grad()
def extract_concept_vectors(
    model,
    tokenizer,
    concepts: tuple[str, ...] | list[str] = CONCEPT_WORDS,
    baseline: tuple[str, ...] | list[str] = BASELINE_WORDS,
    num_loops: int | None = None,
    layers: list[int] | None = None,
    batch_size: int = 16,
    template: str = CONCEPT_TEMPLATE,
    unique_baseline: bool = False,
    model_name: str = "",
) -> ConceptVectors:
    """Concept vectors of a model: ``vectors[word]`` [T, L, H] (T = num_loops, L = len(layers)), float32.

    ``layers`` (0-based, default all) and ``num_loops`` (default the trained depth: ``config.total_ut_steps``, 1 for
    a plain causal LM) are checked.
    """
    n_layers = num_hidden_layers(model)
    num_loops = trained_loops(model) if num_loops is None else int(num_loops)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct 0-based indices in 0..{n_layers - 1}, got {layers}")
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    if "{word}" not in template:
        raise ValueError("the concept template must contain '{word}'")
    if not concepts or not baseline:
        raise ValueError("need at least one concept word and one baseline word")
    if len(set(concepts)) != len(concepts):
        raise ValueError("concept words must be distinct (they are the safetensors keys)")
    base_words = list(dict.fromkeys(baseline)) if unique_baseline else list(baseline)
    was_training = model.training
    model.eval()
    try:
        base = _last_token_states(model, tokenizer, base_words, num_loops, layers, batch_size, template).mean(0)
        conc = _last_token_states(model, tokenizer, list(concepts), num_loops, layers, batch_size, template)
    finally:
        model.train(was_training)
    vectors = {w: (conc[i] - base).contiguous() for i, w in enumerate(concepts)}
    meta = {
        "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "num_loops": num_loops,
        "layers": layers,
        "template": template,
        "hidden_size": int(model.config.hidden_size),
        "position": "last prompt token (assistant turn start)",
        "concepts": list(concepts),
        "baseline": base_words,
        "shape": "[T, L, H]",
        "format_version": FORMAT_VERSION,
    }
    return ConceptVectors(vectors, meta)


def vectors_hash(cv: ConceptVectors) -> str:
    """sha256 of the vectors (float32 bytes, words in order) and the canonical metadata (file bytes are not
    stable: safetensors may order its header differently between runs)."""
    h = hashlib.sha256(json.dumps(cv.metadata, sort_keys=True).encode())
    for w, v in cv.vectors.items():
        h.update(w.encode() + b"\0")
        h.update(v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def save_concept_vectors(cv: ConceptVectors, path: str | os.PathLike) -> None:
    """Write a safetensors file (key = word, [T, L, H]) with JSON-encoded metadata; atomic (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: json.dumps(v) for k, v in cv.metadata.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({w: v.contiguous() for w, v in cv.vectors.items()}, tmp, metadata=meta)
        apply_umask(tmp, folder=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_concept_vectors(path: str | os.PathLike) -> ConceptVectors:
    """Read a file written by :func:`save_concept_vectors`; checks shapes against the metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"concept vector file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        try:
            meta = {k: json.loads(v) for k, v in raw.items()}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata is not JSON-encoded ({e})") from None
        missing = [k for k in ("num_loops", "layers", "hidden_size", "model", "template") if k not in meta]
        if missing:
            raise ValueError(f"{path}: metadata lacks {missing}; not a concept-vector file")
        order = meta.get("concepts") or sorted(f.keys())
        vectors = {w: f.get_tensor(w) for w in order}
    want = (meta["num_loops"], len(meta["layers"]), meta["hidden_size"])
    for w, v in vectors.items():
        if tuple(v.shape) != want:
            raise ValueError(f"{path}: vector {w!r} has shape {list(v.shape)}, metadata says {list(want)}")
    return ConceptVectors(vectors, meta)


def load_vectors(vectors) -> ConceptVectors:
    """A ConceptVectors as given, or loaded from a safetensors path."""
    if isinstance(vectors, ConceptVectors):
        return vectors
    if isinstance(vectors, (str, os.PathLike)):
        return load_concept_vectors(vectors)
    raise TypeError(f"concept_vectors must be a ConceptVectors or a path, got {type(vectors).__name__}")


def vector_norms(cv: ConceptVectors) -> torch.Tensor:
    """[T, L] mean L2 norm of the concept vectors per (extraction loop, layer), over the words."""
    return torch.stack([v.float().norm(dim=-1) for v in cv.vectors.values()]).mean(0)


def default_vector_layer(model_config) -> int:
    """The layer the protocol extracts at when none is given: about 2/3 of the depth (0-based)."""
    return max(0, round(2 * int(model_config.num_hidden_layers) / 3) - 1)


def concept_vectors_for(
    model,
    tokenizer,
    path: str | os.PathLike | None = None,
    concepts: tuple[str, ...] | list[str] = CONCEPT_WORDS,
    layers: list[int] | tuple[int, ...] | None = None,
    num_loops: int | None = None,
    batch_size: int = 16,
) -> ConceptVectors:
    """Vectors loaded from ``path``, or extracted for ``concepts`` at ``layers`` (default
    :func:`default_vector_layer`) over ``num_loops`` loops."""
    if path:
        return load_concept_vectors(path)
    layers = [default_vector_layer(model.config)] if layers is None else list(layers)
    return extract_concept_vectors(
        model, tokenizer, tuple(concepts), num_loops=num_loops, layers=layers, batch_size=batch_size
    )
