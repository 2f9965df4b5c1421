"""A short console log for gap SFT: the Trainer prints every logged metric at every logging step
(for 4 loops and a few terms, 40 keys). Everything still goes to W&B / the trainer state; the
console shows the objective, its terms, SV at the trained depth and the learning rate."""

from __future__ import annotations

from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["ShortProgressCallback", "use_short_console_log"]


def short_logs(logs: dict, num_loops: int | None = None) -> dict:
    """The console's share of a Trainer log: loss, the terms' losses, SV and the probe figures at the
    deepest loop, learning rate, epoch and the end-of-training summary; per-loop details are left out."""
    keep = {}
    deepest = f"/loop_{num_loops}" if num_loops else None
    for key, value in logs.items():
        if "/loop_" in key:
            if deepest and key.endswith(deepest) and key.split("/")[0] in ("sv", "probe_acc"):
                keep[key] = value
            continue
        keep[key] = value
    return keep


class ShortProgressCallback(ProgressCallback):
    """ProgressCallback whose printed logs are :func:`short_logs`."""

    def __init__(self, num_loops: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_loops = num_loops

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=short_logs(logs or {}, self.num_loops), **kwargs)


class ShortPrinterCallback(PrinterCallback):
    """PrinterCallback (used when the progress bar is off) whose printed logs are :func:`short_logs`."""

    def __init__(self, num_loops: int | None = None):
        super().__init__()
        self.num_loops = num_loops

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=short_logs(logs or {}, self.num_loops), **kwargs)


def use_short_console_log(trainer, num_loops: int | None = None) -> None:
    """Swap the trainer's console printer for the short one (W&B and the trainer state keep every key)."""
    for old, new in ((ProgressCallback, ShortProgressCallback), (PrinterCallback, ShortPrinterCallback)):
        if any(isinstance(cb, old) and not isinstance(cb, new) for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(old)
            trainer.add_callback(new(num_loops=num_loops))
