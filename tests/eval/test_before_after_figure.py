"""[ecosystem] item 5: the run at a glance. TP, SV and RR per loop before (dashed) and after (solid) on one 0-100% axis,
with the chance line, the trained depth marked, loops past it shaded and CI bands; a one-loop model over its layers."""

import matplotlib
import numpy as np

from loopalign.eval import GapResult, gap_table
from loopalign.eval.report import before_after_figure, save_figure

matplotlib.use("Agg")


def _result(loops, sv_acc, rr_acc, tp=None, seed=0):
    rng = np.random.default_rng(seed)
    n = 200
    y = np.tile([1, 0], n // 2)
    tasks = [f"t{i // 2}" for i in range(n)]

    def prob(acc):
        right = rng.random(n) < acc
        return np.where(right == (y == 1), 0.8, 0.2)

    sv = np.stack([prob(a) for a in sv_acc])
    rr = np.stack([prob(a) for a in rr_acc])
    table = gap_table(y, sv, (sv > 0.5).astype(np.int64), rr, loops, n_boot=20, clusters=tasks)
    tp_rows = [{"loop": t, "accuracy": a} for t, a in zip(loops, tp)] if tp else None
    heat = {"layers": ["3", "6", "9"], "test": [[0.6, 0.7, 0.65] for _ in loops], "val": []}
    return GapResult(loops=list(loops), metric="accuracy", table=table, sv=[], sv_eval=[], rr=[], rr_fixed=[],
                     heatmap=heat, records={}, tp=tp_rows, meta={"n_eval": n})  # fmt: skip


def test_the_looped_figure_shares_one_axis_marks_the_depth_and_draws_before_dashed_after_solid(tmp_path):
    loops = [1, 2, 3, 4, 5, 6]
    before = _result(loops, [0.55] * 6, [0.7] * 6, tp=[0.9] * 6)
    after = _result(loops, [0.7] * 6, [0.72] * 6, tp=[0.88] * 6, seed=1)
    fig = before_after_figure(before, after, depth=4, title="run")
    (ax,) = fig.axes
    assert ax.get_ylim() == (0.0, 100.0)
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    for key in ("SV", "RR", "TP"):
        assert styles[f"{key} before"] == "--" and styles[f"{key} after"] == "-"
    assert styles["chance (50%)"] == ":"
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith("_")] == [4]  # the depth
    assert "extrapolation" in [p.get_label() for p in ax.patches]
    assert "95% cluster-bootstrap" in ax.get_title()
    paths = save_figure(fig, str(tmp_path), "before_after")
    assert sorted(paths) == ["before_after.png", "before_after.svg"] and (tmp_path / "before_after.png").exists()


def test_a_one_loop_model_is_drawn_over_its_layers():
    before, after = _result([1], [0.5], [0.7]), _result([1], [0.6], [0.72], seed=1)
    (ax,) = before_after_figure(before, after, depth=1).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "6", "9"]
    rr_after = next(line for line in ax.get_lines() if line.get_label() == "RR after")
    assert list(rr_after.get_ydata()) == [60.0, 70.0, 65.0]
