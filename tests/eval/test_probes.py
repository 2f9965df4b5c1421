import numpy as np
import pytest
import torch

from loopalign.eval.metrics import accuracy
from loopalign.probes import LinearProbe, ProbeFitConfig, fit_probes, load_probes, save_probes


def _planted(n=400, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g) * 3.0 + 5.0  # off-centre, scaled: standardisation matters
    w = torch.randn(h, generator=g)
    y = ((x - 5.0) @ w + 0.3 * torch.randn(n, generator=g) > 0).long()
    return x, y


def test_probe_recovers_planted_signal():
    x, y = _planted()
    probes = fit_probes(x[:300], y[:300], [1e-3, 1e-1], ProbeFitConfig(device="cpu"))
    for p in probes:
        acc = accuracy(y[300:].numpy(), (p.predict_proba(x[300:]) > 0.5).long().numpy())
        assert acc > 0.9, acc


def test_probe_near_chance_on_shuffled_labels():
    x, y = _planted(n=600)
    y_shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    (p,) = fit_probes(x[:400], y_shuffled[:400], [1e-1], ProbeFitConfig(device="cpu"))
    acc = accuracy(y_shuffled[400:].numpy(), (p.predict_proba(x[400:]) > 0.5).long().numpy())
    assert 0.35 < acc < 0.65, acc


def test_probe_save_load_roundtrip(tmp_path):
    x, y = _planted(n=100)
    (p,) = fit_probes(x, y, [1e-2])
    p.meta.update(loop=2, layer=1)
    save_probes({"loop2_best": p, "other": p}, str(tmp_path / "probes"))
    loaded = load_probes(str(tmp_path / "probes.safetensors"))
    assert set(loaded) == {"loop2_best", "other"}
    q = loaded["loop2_best"]
    assert q.meta["loop"] == 2 and q.meta["l2"] == pytest.approx(1e-2)
    torch.testing.assert_close(q.predict_proba(x), p.predict_proba(x))
    p.save(str(tmp_path / "single"))
    torch.testing.assert_close(LinearProbe.load(str(tmp_path / "single")).logits(x), p.logits(x))
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp")]


def test_probe_fit_errors():
    x, y = _planted(n=20)
    with pytest.raises(ValueError, match="single class"):
        fit_probes(x, torch.ones(20, dtype=torch.long), [1.0])
    with pytest.raises(ValueError, match="empty"):
        fit_probes(x[:0], y[:0], [1.0])
    with pytest.raises(ValueError, match="expects features of size 16"):
        fit_probes(x, y, [1.0])[0].logits(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_iter"):
        ProbeFitConfig(max_iter=0)
    assert np.isfinite(fit_probes(x, y, [0.0])[0].weight.numpy()).all()


@pytest.mark.parametrize("solver,floor", [("lbfgs", 2e-3), ("newton", 1e-5)])
def test_each_probe_is_a_stationary_point_of_its_documented_loss(solver, floor):
    """The fit minimises mean BCE + l2/2 * ||w||^2 on standardised features (bias unpenalised): autograd's gradient
    of that loss, written here independently of the fit's own, vanishes at every returned probe, down to the noise
    floor of a float32 fit (the C probes' summed loss stops changing measurably near 1e-4..1e-3). A wrong gradient in
    the fit (a missing 1/N, the penalty on the bias) would stop it orders of magnitude away. Newton's method (float64)
    goes much further down."""
    x, y = _planted(n=200)
    l2 = [1e-2, 1e-1, 1.0]
    for probe, strength in zip(fit_probes(x, y, l2, ProbeFitConfig(device="cpu", max_iter=500, solver=solver)), l2):
        w, b = probe.weight.clone().requires_grad_(True), probe.bias.clone().requires_grad_(True)
        z = (x - probe.mean) / probe.std
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float()) + strength / 2 * (w @ w)
        loss.backward()
        assert w.grad.abs().max() < 2e-3 and b.grad.abs() < 2e-3, (strength, w.grad.abs().max(), b.grad)
    # and the strengths order the weights' sizes (more penalty, smaller weights)
    norms = [p.weight.norm().item() for p in fit_probes(x, y, l2)]
    assert norms[0] > norms[1] > norms[2]


def test_the_solvers_agree_and_auto_picks_by_size_and_strength():
    """Newton and L-BFGS reach the same probes (within L-BFGS's float32 stop); "auto" takes Newton for a small
    problem whose strengths are all > 0, L-BFGS for l2 = 0 or a problem past NEWTON_MAX_WORK."""
    from loopalign.probes import NEWTON_MAX_WORK, probe_solver

    x, y = _planted(n=300)
    newton = fit_probes(x, y, [1e-2, 1.0], ProbeFitConfig(solver="newton"))
    lbfgs = fit_probes(x, y, [1e-2, 1.0], ProbeFitConfig(solver="lbfgs"))
    for a, b in zip(newton, lbfgs):
        assert (a.weight - b.weight).norm() / a.weight.norm() < 1e-2
        assert a.bias.shape == b.bias.shape == ()
    assert probe_solver(300, 16, [1e-2, 1.0]) == "newton"
    assert probe_solver(300, 16, [0.0, 1e-2]) == "lbfgs"  # l2 = 0: the Hessian can be singular
    assert probe_solver(1252, 576, [1e-4, 1e-3, 1e-2, 1e-1, 1.0]) == "lbfgs"  # a 135M model's hidden states
    assert probe_solver(60, 576, [1e-4, 1e-3, 1e-2, 1e-1, 1.0]) == "lbfgs"  # ... even on few records
    assert probe_solver(600, 64, [1e-4, 1e-3, 1e-2, 1e-1, 1.0]) == "newton"  # the organism's
    assert probe_solver(int(NEWTON_MAX_WORK), 16, [1.0]) == "lbfgs"
    assert probe_solver(300, 16, [1e-2], "lbfgs") == "lbfgs"
    with pytest.raises(ValueError, match="solver must be"):
        ProbeFitConfig(solver="adam")


def test_probe_fit_completes_with_two_torch_threads():
    """torch 2.13's CPU build fails a batched LU solve with more than one thread (oneMKL: "Parameter 6 was incorrect
    on entry to DLASWP", then spins for good); the Newton fit solves one probe at a time, so a fit with two threads
    ends, quietly, with the one-thread fit's probes."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from loopalign.probes import fit_probes\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(40, 384); y = (x[:, 0] + 0.3 * torch.randn(40) > 0).long()\n"
        "out = []\n"
        "for threads in (2, 1):\n"
        "    torch.set_num_threads(threads)\n"
        "    out.append(torch.cat([p.weight.flatten() for p in fit_probes(x, y, [1e-4, 1e-2, 1.0])]))\n"
        "print(float((out[0] - out[1]).abs().max()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MKL ERROR" not in done.stderr
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-6
