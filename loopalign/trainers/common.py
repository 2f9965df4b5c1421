"""Plumbing every loopalign trainer shares: the bf16 default, a model given by name, the pad rule, and atomic
checkpoints (:class:`AtomicCheckpointMixin`: an interrupted save never leaves a half ``checkpoint-N`` that a
resume would pick up). ``GapSFTTrainer``, ``IntrospectionSFTTrainer`` and ``IntrospectionGRPOTrainer`` use it."""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from loopalign.io import apply_umask_tree
from loopalign.loading import ensure_pad_token, load_pretrained, load_tokenizer

__all__ = ["AtomicCheckpointMixin", "clear_staging", "default_bf16", "model_and_tokenizer"]


def default_bf16(bf16: bool | None) -> bool:
    """The bf16 default of every loopalign config: on where a CUDA device supports it, else off (CPU runs fp32
    unless asked)."""
    if bf16 is not None:
        return bool(bf16)
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def model_and_tokenizer(model, processing_class=None, model_init_kwargs: dict | None = None):
    """A model or a name (loaded through :func:`loopalign.loading.load_pretrained` with ``model_init_kwargs``),
    and its tokenizer (given, else the model's own), with the pad rule applied. -> (model, tokenizer)."""
    if isinstance(model, str):
        model = load_pretrained(model, **(model_init_kwargs or {}))
    if processing_class is None:
        processing_class = load_tokenizer(model.config._name_or_path)
    return model, ensure_pad_token(processing_class)


def clear_staging(staging: str) -> None:
    """Remove the half ``checkpoint-*`` folders that interrupted saves left in the staging folder (no
    resume reads them; left there, the trainer's checkpoint rotation inside the staging folder could
    count them and delete the checkpoint being written)."""
    if not os.path.isdir(staging):
        return
    for entry in os.scandir(staging):
        if entry.name.startswith("checkpoint-") and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)


class AtomicCheckpointMixin:
    """Mix into a ``transformers.Trainer`` subclass (before the Trainer in the bases): checkpoints are written into
    ``<output_dir>/.staging/`` and renamed into place when complete, with the umask's modes."""

    def _get_output_dir(self, trial):
        staging = getattr(self, "_checkpoint_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Half checkpoints of earlier interrupted saves are removed from ``.staging/`` first, and the emptied
        ``.staging/`` after the rename: only an interrupted save leaves it behind."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")
        if self.args.should_save:
            clear_staging(staging)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            apply_umask_tree(os.path.join(staging, name))  # transformers writes weights 0600
            os.replace(os.path.join(staging, name), final)
            with contextlib.suppress(OSError):  # empty now; left only if something not ours is in it
                os.rmdir(staging)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
