"""Probes: L2-regularised logistic-regression probes fit in torch (:class:`LinearProbe`, full-batch L-BFGS,
GPU when present), and the trainable per-loop probe module the objectives use (:class:`LoopProbes`).

Features are standardised with the training set's mean and standard deviation, which the probe
stores, so ``probe.predict_proba(raw_features)`` works on raw hidden states. Shapes: N records,
H hidden size, C regularisation strengths fit together.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loopalign.errors import ConfigError
from loopalign.io import atomic_write

__all__ = [
    "LinearProbe",
    "LoopProbes",
    "ProbeFitConfig",
    "fit_probes",
    "probe_solver",
    "float32_region",
    "save_probes",
    "load_probes",
]


@dataclass
class ProbeFitConfig:
    """How probes are fit."""

    max_iter: int = 200  # iterations (full batch) of either solver
    tol: float = 1e-6  # gradient tolerance (L-BFGS: also the loss change's, x 1e-3)
    device: str | None = None  # "cuda", "cpu"; None = cuda when available
    dtype: torch.dtype = torch.float32  # compute dtype of the L-BFGS fit (Newton's runs in float64)
    solver: str = "auto"  # "newton" | "lbfgs" | "auto": Newton for small problems with every l2 > 0, else L-BFGS

    def __post_init__(self):
        if self.max_iter < 1:
            raise ConfigError(f"ProbeFitConfig.max_iter must be >= 1, got {self.max_iter}")
        if self.solver not in ("auto", "newton", "lbfgs"):
            raise ConfigError(f"ProbeFitConfig.solver must be 'auto', 'newton' or 'lbfgs', got {self.solver!r}")
        if self.tol <= 0:
            raise ConfigError(f"ProbeFitConfig.tol must be > 0, got {self.tol}")

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class LinearProbe:
    """p(label 1 | x) = sigmoid(w . (x - mean) / std + b). weight/mean/std [H], bias scalar."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict = field(default_factory=dict)  # l2, loop, layer, position, metrics ...

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N,H] raw features -> logits [N]."""
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"probe expects features of size {self.weight.shape[0]}, got {x.shape[-1]}")
        w = self.weight.to(x.device, torch.float32)
        z = (x.float() - self.mean.to(x.device, torch.float32)) / self.std.to(x.device, torch.float32)
        return z @ w + self.bias.to(x.device, torch.float32)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """x [N,H] -> P(label 1) [N]."""
        return torch.sigmoid(self.logits(x))

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        t = {"weight": self.weight, "bias": self.bias.reshape(1), "mean": self.mean, "std": self.std}
        return {prefix + k: v.detach().float().cpu().clone().contiguous() for k, v in t.items()}

    def save(self, path: str) -> None:
        """Write ``path``.safetensors and ``path``.json (atomically)."""
        save_probes({"probe": self}, path)

    @classmethod
    def load(cls, path: str) -> LinearProbe:
        return load_probes(path)["probe"]


def standardise_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N,H] -> (mean [H], std [H]); constant features get std 1."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > eps, std, torch.ones_like(std))


#: the largest fit solved by Newton's method under ``solver="auto"``, in multiply-adds per iteration (the C
#: Hessians and their solves, C x (H+1)^2 x (N + (H+1)/3)): tiny models' hidden states, not a real LM's
NEWTON_MAX_WORK = 2e8


def probe_solver(n: int, h: int, l2, solver: str = "auto") -> str:
    """The solver of a fit of ``n`` records x ``h`` features at the strengths ``l2``: ``solver`` unless "auto",
    which takes Newton's method when every strength is > 0 (the Hessian is then positive definite) and one
    iteration (the C Hessians and their solves) is at most :data:`NEWTON_MAX_WORK` multiply-adds, else L-BFGS (wide
    hidden states: a 135M model's 576 features take L-BFGS whatever the record count). -> "newton" | "lbfgs"."""
    if solver != "auto":
        return solver
    work = len(l2) * (h + 1) ** 2 * (n + (h + 1) / 3)
    return "newton" if min(l2) > 0 and work <= NEWTON_MAX_WORK else "lbfgs"


def _standardised(x: torch.Tensor, dtype: torch.dtype):
    x = x.to(dtype)
    mean, std = standardise_stats(x)
    return (x - mean) / std, mean, std


def _fit_lbfgs(x, y, l2, config: ProbeFitConfig):
    """The C probes' summed loss minimised jointly by full-batch L-BFGS (strong-Wolfe line search) in
    ``config.dtype``; -> (w [C,H], b [C], mean [H], std [H])."""
    z, mean, std = _standardised(x, config.dtype)
    yf = y.to(config.dtype)
    n = x.shape[0]
    lam = torch.tensor(list(l2), device=x.device, dtype=config.dtype)  # [C]
    w = torch.zeros(len(l2), x.shape[1], device=x.device, dtype=config.dtype)
    prior = float(yf.mean().clamp(1e-4, 1 - 1e-4))
    b = torch.full((len(l2),), torch.logit(torch.tensor(prior)).item(), device=x.device, dtype=config.dtype)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=config.max_iter,
        tolerance_grad=config.tol,
        tolerance_change=config.tol * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    @torch.no_grad()
    def closure():  # the loss and its gradient written out (no autograd graph: most of a fit's time was its overhead)
        logits = torch.addmm(b[:, None], w, z.T)  # [C,N]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, yf.expand_as(logits), reduction="none")
        residual = torch.sigmoid(logits) - yf  # d(bce)/d(logits)
        w.grad = residual @ z / n + lam[:, None] * w
        b.grad = residual.mean(1)
        return bce.mean(1).sum() + 0.5 * (lam * (w * w).sum(1)).sum()

    opt.step(closure)
    return w, b, mean, std


def _fit_newton(x, y, l2, config: ProbeFitConfig):
    """Each probe's loss minimised by Newton's method with a backtracking (Armijo) line search, in float64, the C
    probes batched: converges to the optimum in a few iterations, where L-BFGS on a small problem spends most of
    its time in per-iteration overhead. -> (w [C,H], b [C], mean [H], std [H]) in ``config.dtype``."""
    z, mean, std = _standardised(x, torch.float64)
    n, h = z.shape
    za = torch.cat([z, torch.ones(n, 1, dtype=z.dtype, device=z.device)], 1)  # [N,H+1]: the bias is the last weight
    yf = y.to(torch.float64)
    penalty = torch.tensor(list(l2), dtype=torch.float64, device=z.device)[:, None] * torch.cat(
        [torch.ones(h, dtype=torch.float64, device=z.device), torch.zeros(1, dtype=torch.float64, device=z.device)]
    )  # [C,H+1]: l2 on the weights, none on the bias
    theta = torch.zeros(len(l2), h + 1, dtype=torch.float64, device=z.device)
    theta[:, h] = math.log(float(yf.mean()) / (1 - float(yf.mean())))

    def losses(t, logits=None):  # [C]
        logits = t @ za.T if logits is None else logits
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, yf.expand_as(logits), reduction="none")
        return bce.mean(1) + 0.5 * (penalty * t * t).sum(1)

    active = torch.ones(len(l2), dtype=torch.bool, device=z.device)
    for _ in range(config.max_iter):
        logits = theta @ za.T  # [C,N]
        p = torch.sigmoid(logits)
        grad = (p - yf) @ za / n + penalty * theta  # [C,H+1]
        active &= grad.abs().amax(1) > config.tol
        if not active.any():
            break
        weighted = za.unsqueeze(0) * (p * (1 - p) / n).unsqueeze(-1)  # [C,N,H+1]
        hessian = weighted.transpose(1, 2) @ za + torch.diag_embed(penalty)  # [C,H+1,H+1]
        # one solve per probe: torch 2.13's CPU build (oneMKL) fails a batched LU with more than one thread ("Parameter
        # 6 was incorrect on entry to DLASWP", then spins); a single matrix's solve is the same LAPACK call
        step = torch.stack([torch.linalg.solve(hessian[c], grad[c]) for c in range(len(l2))])  # [C,H+1]
        step[~active] = 0
        before, decrease = losses(theta, logits), (grad * step).sum(1)
        t = torch.ones(len(l2), dtype=torch.float64, device=z.device)
        for _ in range(40):  # halve each probe's step until its loss falls enough (Armijo)
            ok = losses(theta - t[:, None] * step) <= before - 1e-4 * t * decrease
            if ok.all():
                break
            t = torch.where(ok, t, t / 2)
        theta = theta - t[:, None] * step
    dtype = config.dtype
    return theta[:, :h].to(dtype), theta[:, h].to(dtype), mean.to(dtype), std.to(dtype)


def fit_probes(
    x: torch.Tensor, y: torch.Tensor, l2: list[float] | tuple[float, ...], config: ProbeFitConfig | None = None
) -> list[LinearProbe]:
    """Fit one probe per L2 strength on x [N,H] (raw), y [N] in {0,1}.

    Loss per probe: mean binary cross-entropy + l2/2 * ||w||^2 on standardised features (bias
    unpenalised). The C probes are independent. ``config.solver``: Newton's method (float64, the C probes batched,
    to a gradient below ``config.tol``) for small problems whose strengths are all > 0, else full-batch L-BFGS on
    their summed loss (``"auto"``, the default, picks by :data:`NEWTON_MAX_WORK`).
    """
    config = config or ProbeFitConfig()
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_probes needs x [N,H] and y [N], got {list(x.shape)} and {list(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("fit_probes: the training set is empty")
    classes = set(torch.unique(y).tolist())
    if not classes <= {0, 1}:
        raise ValueError(f"fit_probes: labels must be 0/1, got {sorted(classes)}")
    if len(classes) < 2:
        raise ValueError(f"fit_probes: the training set has a single class ({classes.pop()}); need both 0 and 1")
    if not l2 or any(c < 0 for c in l2):
        raise ValueError(f"fit_probes: l2 must be a non-empty list of strengths >= 0, got {l2}")
    device = config.resolved_device()
    if probe_solver(x.shape[0], x.shape[1], l2, config.solver) == "newton":
        w, b, mean, std = _fit_newton(x.to(device), y.to(device), l2, config)
    else:
        w, b, mean, std = _fit_lbfgs(x.to(device), y.to(device), l2, config)
    probes = []
    for c, strength in enumerate(l2):
        probes.append(
            LinearProbe(
                weight=w[c].detach().cpu().float(),
                bias=b[c].detach().cpu().float().reshape(()),
                mean=mean.cpu().float(),
                std=std.cpu().float(),
                meta={"l2": float(strength), "n_train": int(x.shape[0])},
            )
        )
    return probes


def save_probes(probes: dict[str, LinearProbe], path: str) -> None:
    """Save named probes to ``path``.safetensors (tensors ``{name}.weight`` ...) and ``path``.json (meta)."""
    path = path.removesuffix(".safetensors").removesuffix(".json")
    tensors: dict[str, torch.Tensor] = {}
    meta = {}
    for name, probe in probes.items():
        if "." in name:
            raise ValueError(f"probe name {name!r} must not contain '.'")
        tensors.update(probe.state(prefix=f"{name}."))
        meta[name] = probe.meta
    atomic_write(path + ".safetensors", lambda p: save_file(tensors, p))

    def write_json(p):
        with open(p, "w") as f:
            json.dump({"format": "loopalign.linear_probe.v1", "probes": meta}, f, indent=2)

    atomic_write(path + ".json", write_json)


def load_probes(path: str) -> dict[str, LinearProbe]:
    """Inverse of :func:`save_probes`."""
    path = path.removesuffix(".safetensors").removesuffix(".json")
    for ext in (".safetensors", ".json"):
        if not os.path.exists(path + ext):
            raise FileNotFoundError(f"probe file {path + ext} not found")
    tensors = load_file(path + ".safetensors")
    with open(path + ".json") as f:
        meta = json.load(f)["probes"]
    return {
        name: LinearProbe(
            weight=tensors[f"{name}.weight"],
            bias=tensors[f"{name}.bias"].reshape(()),
            mean=tensors[f"{name}.mean"],
            std=tensors[f"{name}.std"],
            meta=m,
        )
        for name, m in meta.items()
    }


def float32_region(device: torch.device | str):
    """A context in which autocast is off on ``device`` (ops run in their inputs' dtype): for the
    small float32 computations (probes) that must not be downcast under mixed precision."""
    device_type = torch.device(device).type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class LoopProbes(nn.Module):
    """One logistic-regression probe per loop: features [T,B,H] -> logits [T,B]."""

    def __init__(self, num_loops: int, hidden_size: int):
        super().__init__()
        if num_loops < 1 or hidden_size < 1:
            raise ValueError(f"LoopProbes needs num_loops >= 1 and hidden_size >= 1, got {num_loops}, {hidden_size}")
        self.weight = nn.Parameter(torch.zeros(num_loops, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_loops))

    @property
    def num_loops(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[0] != self.num_loops or features.shape[2] != self.weight.shape[1]:
            raise ValueError(
                f"probe features must be [T={self.num_loops}, B, H={self.weight.shape[1]}], got {list(features.shape)}"
            )
        weight, bias = self.weight.float(), self.bias.float()
        with float32_region(features.device):
            return torch.einsum("tbh,th->tb", features.float(), weight) + bias[:, None]
