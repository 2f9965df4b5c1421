"""GapSFTTrainer: LoRA on a looped model so that the verbal verdict (SV) catches up with the
representation readout (RR), per loop, without RR degrading.

One forward pass per batch runs all loops; from it come
- ``lm``: per-loop deep supervision on the target verdict tokens (loop weighting: uniform, last,
  a list, or Ouro's entropy-regularised exit objective), optionally Ouro's stage-II ``gate`` loss;
- ``probe``: a logistic probe per loop at ``probe_layer``, reading the record's probe position,
  trained on the verifier label (on detached features: it measures, it does not reshape);
- ``consistency``: the verbal Yes/No distribution of each loop pulled toward its probe's posterior;
- ``rr_probe``: probes fit on the base model before training stay frozen; their loss on the tuned
  features is penalised;
- ``rr_distill``: tuned features at the readout sites pulled toward the base model's (adapters off);
- ``probe_distill``: the verbal Yes/No distribution of each loop pulled toward FIXED targets, the
  out-of-fold posteriors of per-loop probes fit once on the base model at the site the evaluation
  reads as RR (``fit_probe_targets``, before training). With ``label_fraction`` < 1 only a
  task-grouped share of the records keeps its label; the rest are trained by this term alone, and
  every label-reading term and metric (lm, probe, rr_probe, sv/rr) sees the labelled records only.
- ``layer_verdict`` (plain causal LMs): the Yes/No verdict read at each of ``verdict_layers`` through the model's
  final norm and LM head (a logit lens), trained on the labels: the one-loop analogue of per-loop deep supervision;
- ``replay``: per-loop LM loss on the model's own answers to the training tasks (a separate small
  batch each step from ``replay_dataset``, see :mod:`loopalign.trainers.replay`), so training the
  verdict does not teach the model to answer everything with it (TP is kept). With ``replay_kind='kl'`` the term is
  KL(base || model) on the answers' whole next-token distributions instead (the base: the model with its adapters
  off), which keeps the model's answers without sharpening its distributions toward the greedy tokens.
Each term has a weight in ``GapSFTConfig.loss_weights`` and is logged per loop
(``loss/loop_t``, ``sv/loop_t`` and, with the joint probes, ``probe_acc/loop_t`` and
``probe_gap/loop_t`` with t = loop count 1..T: training-batch figures at the training probe site,
named apart from the evaluation's RR and gap, which read the evaluation's site on held-out records).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from contextlib import nullcontext

import torch
from safetensors.torch import load_file
from trl import SFTTrainer

from loopalign.eval.families import record_families
from loopalign.hooks import capture_activations
from loopalign.io import apply_umask_tree, atomic_save_safetensors, atomic_write_text
from loopalign.loading import GAP_CONFIG_FILE
from loopalign.log import get_logger
from loopalign.loops import gather_positions, loop_logits, parse_int_set
from loopalign.lora import route_lora_by_loop, skip_lora_input_upcast
from loopalign.models.contract import final_norm, is_looped, loop_forward
from loopalign.objectives import (
    consistency_loss,
    frozen_probe_loss,
    hidden_distillation_loss,
    ouro_entropy_objective,
    ouro_gate_loss,
    per_loop_token_kl,
    per_loop_token_losses,
    probe_distillation_loss,
    probe_loss,
    probe_ranking_distillation_loss,
    verbal_log_probs,
    weighted_loop_loss,
)
from loopalign.prefix_cache import PrefixCache
from loopalign.probes import LoopProbes, fit_probes
from loopalign.speed import compile_decoder_layers

from .base_cache import BaseOutputCache, check_no_base_dropout
from .common import AtomicCheckpointMixin, model_and_tokenizer
from .gap_data import GapCollator, build_gap_features, verdict_token_ids, with_distill_groups
from .gap_sft_config import PROBES_FILE, GapSFTConfig
from .probe_targets import fit_probe_targets, labelled_only
from .replay import collate_replay, replay_features

logger = get_logger(__name__)

__all__ = ["GapSFTTrainer"]


class GapSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
    """SFTTrainer with per-loop gap objectives (see the module doc). Takes rendered verification
    records (``data_builders``) as ``train_dataset`` / ``eval_dataset``."""

    _tag_names = ["trl", "sft", "loopalign", "gap-sft"]

    def __init__(
        self,
        model,
        args: GapSFTConfig,
        train_dataset,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        base_probes: list | None = None,
        replay_dataset=None,
        **kwargs,
    ):
        if not isinstance(args, GapSFTConfig):
            raise TypeError(f"GapSFTTrainer needs a GapSFTConfig, got {type(args).__name__}")
        model, processing_class = model_and_tokenizer(model, processing_class, args.model_init_kwargs)
        self.num_loops, self.probe_layer = args.check_against_model(model.config)
        #: layers whose logit-lens verdict the layer_verdict term trains (plain causal LMs), ascending
        self.verdict_layer_indices = (
            list(parse_int_set(args.verdict_layers, "GapSFTConfig.verdict_layers")) if args.verdict_layers else []
        )
        self.yes_id, self.no_id = verdict_token_ids(
            processing_class, args.verdict_yes, args.verdict_no, option="GapSFTConfig.verdict_yes / verdict_no"
        )
        feature_kwargs = dict(
            probe_position=args.probe_position,
            yes=args.verdict_yes,
            no=args.verdict_no,
            max_length=args.max_length,
            completion_only=args.completion_only_loss is not False,
        )
        if args.label_fraction < 1.0 and args.loss_weights["probe_distill"] == 0:
            train_dataset = labelled_only(train_dataset, args.label_fraction, args.seed)
        features = build_gap_features(train_dataset, processing_class, **feature_kwargs)
        eval_features = None
        if eval_dataset is not None:
            eval_features = build_gap_features(eval_dataset, processing_class, **feature_kwargs)
        super().__init__(
            model=model,
            args=args,
            train_dataset=features,
            eval_dataset=eval_features,
            processing_class=processing_class,
            data_collator=GapCollator(processing_class.pad_token_id),
            peft_config=peft_config,
            **kwargs,
        )
        # the loss is averaged inside compute_loss; let the Trainer divide by accumulation steps
        self.model_accepts_loss_kwargs = False
        self.weights = dict(args.loss_weights)
        base_reading = args.base_reading_terms()
        if base_reading and not hasattr(self.model, "disable_adapter"):
            raise ValueError(f"{' and '.join(base_reading)}: a PEFT model is needed (the base = adapters disabled)")
        #: the frozen probe targets' quality (``ProbeTargets.summary()``) when fitted here
        self.probe_targets_summary = None
        if self.weights["probe_distill"] > 0:
            features = self._with_probe_targets(train_dataset, feature_kwargs)
            self.train_dataset = features
        if args.lora_loops != "all":
            route_lora_by_loop(self.model, args.lora_loops)
        skip_lora_input_upcast(self.model)  # under autocast only, where bit-identical (loopalign.lora)
        #: the frozen base's outputs the base-reading terms read (GapSFTConfig.base_cache), kept as records are first seen
        self.base_cache = None
        if args.base_cache and base_reading:
            check_no_base_dropout(self.model)
            self.base_cache = BaseOutputCache()
        #: the frozen lower layers' states per record (GapSFTConfig.prefix_cache), filled as records are first seen
        self.prefix_cache = None
        if args.prefix_cache:
            readout = [self.probe_layer] if self.probe_layer < model.config.num_hidden_layers else []
            readout = sorted(set(readout) | set(self.verdict_layer_indices))  # the logit-lens layers read too
            self.prefix_cache = PrefixCache(self.model, readout_layers=readout)
        if args.compile_layers:
            compile_decoder_layers(self.model, backend=args.compile_layers_backend, mode=args.compile_layers_mode)
        device = next(self.model.parameters()).device
        hidden = model.config.hidden_size
        if self.weights["probe"] > 0:
            # a submodule of the trained model: optimizer, DDP gradient sync and device moves cover it
            self.model.loop_probes = LoopProbes(self.num_loops, hidden).to(device)
        self.base_probes = base_probes
        # task replay (loopalign.trainers.replay): the model's own answers, trained beside the verdict
        self.replay_features = None
        if (replay_dataset is not None) != (self.weights["replay"] > 0):
            raise ValueError(
                "GapSFTTrainer: loss_weights['replay'] > 0 needs a replay_dataset (self_replay_dataset), and a "
                "replay_dataset needs loss_weights['replay'] > 0"
            )
        if replay_dataset is not None:
            self.replay_features = replay_features(replay_dataset, args.max_length)
        # the replay draw's key within a step (gradient accumulation: one draw per micro-batch) and its records
        self._replay_step, self._replay_micro, self.replay_picks = None, 0, []
        if args.replay_batch_size < 1:
            raise ValueError(f"GapSFTConfig.replay_batch_size must be >= 1, got {args.replay_batch_size}")
        if self.weights["rr_probe"] > 0 and self.base_probes is None:
            self.base_probes = self.fit_base_probes(features)
        if self.base_probes is not None and len(self.base_probes) != self.num_loops:
            raise ValueError(f"base_probes has {len(self.base_probes)} probes for num_loops={self.num_loops}")

    # ----- features -------------------------------------------------------------------------
    def _with_probe_targets(self, train_dataset, feature_kwargs: dict):
        """Training features with ``probe_target`` / ``labelled``: the dataset's own, or fitted on
        the base model now (``fit_probe_targets``; the model is on its training device here)."""
        args = self.args
        # each record's group (centring and the pairwise form): read once; fitting the targets keeps the record order
        groups = (
            None if args.distill_center_field is None else record_families(train_dataset, args.distill_center_field)
        )
        if "probe_target" not in train_dataset.column_names:
            targets = fit_probe_targets(
                self.model,
                self.processing_class,
                train_dataset,
                self.num_loops,
                layer=self.probe_layer,
                position=args.distill_position,
                n_folds=args.distill_folds,
                label_fraction=args.label_fraction,
                seed=args.seed,
                batch_size=args.per_device_eval_batch_size,
                verdict_tokens=(args.verdict_yes, args.verdict_no),
                center_groups=groups,
            )
            self.probe_targets_summary = targets.summary()
            if self.is_world_process_zero():
                auroc = ", ".join(f"{a:.3f}" for a in targets.oof_auroc)
                logger.info(
                    f"probe_distill targets: {targets.n_labelled}/{targets.n_records} records labelled; "
                    f"probe OOF AUROC per loop (1..{self.num_loops}): {auroc}"
                )
            train_dataset = targets.dataset
        elif args.label_fraction < 1.0 and "labelled" not in train_dataset.column_names:
            raise ValueError(
                f"GapSFTConfig.label_fraction={args.label_fraction}: the train dataset already carries 'probe_target' "
                "but no 'labelled' column, so its targets were fit on every label; refit them with "
                "fit_probe_targets(label_fraction=...) or drop the column"
            )
        if args.distill_kind == "pairwise":
            train_dataset = with_distill_groups(train_dataset, groups)
        lengths = {len(t) for t in train_dataset["probe_target"]}
        if lengths != {self.num_loops}:
            raise ValueError(
                f"the train dataset's 'probe_target' has {sorted(lengths)} entries per record for "
                f"num_loops={self.num_loops}"
            )
        return build_gap_features(train_dataset, self.processing_class, **feature_kwargs)

    def _loop_forward(self, model, input_ids, attention_mask):
        """All loops in one forward -> an output with ``loop_hidden_states`` (T x [B,S,H]); a looped model also
        gives ``exit_probs`` / ``gate_logits``; a plain causal LM is its one loop (:func:`loop_forward`)."""
        if is_looped(model):
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_loops=self.num_loops,
                output_loop_states=True,
                use_cache=False,
                exit="last",
                logits_to_keep=1,
            )
        return loop_forward(model, input_ids, attention_mask, num_loops=1, logits_to_keep=1)

    def _prefix_states(self, model, input_ids, attention_mask):
        """Inside: one forward of this batch runs on the cached lower-layer states (GapSFTConfig.prefix_cache)."""
        if self.prefix_cache is None:
            return nullcontext()
        return self.prefix_cache.substitute(model, input_ids, attention_mask)

    def _readout_features(self, model, inputs, detach: bool, lens_layers=()):
        """One forward of all loops -> (output, features [T,B,H] at probe_layer, the capture of the residual stream at
        ``lens_layers`` at the verdict position (kept in the graph; None without lens layers))."""
        num_layers = self.model.config.num_hidden_layers
        positions = inputs["probe_index"][:, None]
        sites = [(t, self.probe_layer) for t in range(self.num_loops)] if self.probe_layer < num_layers else [(0, 0)]
        # the prefix cache fills before the capture hooks go on, so they see only this forward
        lens = (
            capture_activations(
                model, [(0, i) for i in lens_layers], positions=inputs["verdict_index"][:, None], detach=False
            )
            if lens_layers
            else contextlib.nullcontext()
        )
        with (
            self._prefix_states(model, inputs["input_ids"], inputs["attention_mask"]),
            capture_activations(model, sites, positions=positions, detach=detach) as cap,
            lens as lens_cap,
        ):
            out = self._loop_forward(model, inputs["input_ids"], inputs["attention_mask"])
        if self.probe_layer == num_layers:
            feats = [gather_positions(h, positions)[:, 0] for h in out.loop_hidden_states]
            feats = [f.detach() for f in feats] if detach else feats
        else:
            feats = [cap.get(t, self.probe_layer)[:, 0] for t in range(self.num_loops)]
        return out, torch.stack(feats), lens_cap

    @torch.no_grad()
    def fit_base_probes(self, features) -> list:
        """Fit one L2 logistic probe per loop on the base model's (adapters disabled) features of the
        training set's labelled records; they stay frozen for the rr_probe term."""
        model = self.model
        collate = GapCollator(self.processing_class.pad_token_id)
        device = next(model.parameters()).device
        disable = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.enable_grad()
        xs, ys = [], []
        was_training = model.training
        model.eval()
        # fit on the features of the forward training runs: under autocast with bf16 mixed precision
        with disable, self.accelerator.autocast():
            for start in range(0, len(features), self.args.per_device_eval_batch_size):
                rows = [
                    features[i] for i in range(start, min(start + self.args.per_device_eval_batch_size, len(features)))
                ]
                batch = {k: v.to(device) for k, v in collate(rows).items()}
                _, feats, _ = self._readout_features(model, batch, detach=True)
                keep = batch["labelled"].cpu()  # records without a label stay out of the fit
                xs.append(feats.float().cpu()[:, keep])
                ys.append(batch["label"].cpu()[keep])
        model.train(was_training)
        x, y = torch.cat(xs, dim=1), torch.cat(ys)
        return [fit_probes(x[t], y, [self.args.base_probe_l2])[0] for t in range(self.num_loops)]

    # ----- loss -----------------------------------------------------------------------------
    def _loop_weights(self, device) -> torch.Tensor:
        T = self.num_loops
        kind = self.args.loop_weighting
        if kind == "last":
            w = torch.zeros(T)
            w[-1] = 1.0
        elif kind == "list":
            w = torch.tensor(self.args.loop_weights, dtype=torch.float32)
        else:
            w = torch.full((T,), 1.0 / T)
        return w.to(device)

    def _logs_this_step(self, model) -> bool:
        """True in evaluation, and in training on a step whose metrics the Trainer will log."""
        if not model.training or self.args.logging_strategy != "steps":
            return True
        every = self.args.logging_steps
        if every < 1:  # a ratio of the total steps, turned into a count by Trainer.train
            every = self.state.logging_steps if self.state.logging_steps >= 1 else 1
        every = max(1, int(every))
        step = self.state.global_step  # the optimizer step this batch belongs to, 0-based
        return (step + 1) % every == 0 or (step == 0 and self.args.logging_first_step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Mixed precision: accelerate runs the model's forward under autocast and hands its outputs
        # back in float32 (convert_outputs_to_fp32), but the Trainer calls compute_loss outside
        # autocast. The loss code (a head matmul per loop) runs under the same autocast, so it works
        # in the compute dtype; the objectives cast to the head's dtype and reduce in float32, and
        # the probes run in float32 (autocast off inside them).
        with self.accelerator.autocast():
            return self._gap_loss(model, inputs, return_outputs)

    def _gap_loss(self, model, inputs, return_outputs: bool):
        mode = "train" if model.training else "eval"
        w = self.weights
        needs_grad_features = w["rr_probe"] > 0 or w["rr_distill"] > 0
        lens_layers = self.verdict_layer_indices if w["layer_verdict"] > 0 else []
        out, feats, lens_cap = self._readout_features(
            model, inputs, detach=not needs_grad_features, lens_layers=lens_layers
        )
        unwrapped = self.accelerator.unwrap_model(model)
        lm_head = unwrapped.get_output_embeddings()
        loop_w = self._loop_weights(feats.device)
        labels = inputs["label"]
        # records whose label may be read (label_fraction < 1: the others carry label -1)
        labelled = inputs["labelled"] if "labelled" in inputs else torch.ones_like(labels, dtype=torch.bool)
        mask = labelled.float()
        terms: dict[str, torch.Tensor] = {}
        per_loop: dict[str, torch.Tensor] = {}

        # Loops that no LM term weights are only logged: scored without autograd, and only on steps
        # that log (in training), so a last-loop-only run pays for one readout on the others.
        if w["lm"] > 0 and self.args.loop_weighting == "ouro_entropy":
            grad_loops = [True] * self.num_loops
        else:
            grad_loops = ((loop_w > 0) & (w["lm"] > 0)).tolist()
        log_all = w["gate"] > 0 or self._logs_this_step(model)
        score_loops = [g or log_all for g in grad_loops]
        token_losses, index = per_loop_token_losses(
            lm_head,
            out.loop_hidden_states,
            inputs["labels"],
            self.args.lm_chunk_size,
            grad_loops=grad_loops,
            score_loops=score_loops,
        )
        per_loop["loss"] = (
            token_losses.mean(dim=1).detach() if token_losses.shape[1] else token_losses.new_zeros(self.num_loops)
        )
        per_loop["loss"][~torch.tensor(score_loops, device=per_loop["loss"].device)] = float("nan")
        if w["lm"] > 0:
            if self.args.loop_weighting == "ouro_entropy":
                exit_probs = out.exit_probs.reshape(-1, self.num_loops)[index]
                terms["lm"], _ = ouro_entropy_objective(token_losses, exit_probs, self.args.entropy_beta)
            else:
                terms["lm"], _ = weighted_loop_loss(token_losses, loop_w)
        if w["replay"] > 0 and model.training:
            terms["replay"], per_loop["replay"] = self._replay_loss(model, lm_head, loop_w)
        if w["gate"] > 0:
            gates = torch.stack(out.gate_logits, dim=-1).reshape(-1, self.num_loops)[index]
            terms["gate"] = ouro_gate_loss(token_losses, gates)

        if lens_cap is not None:  # the verdict at earlier layers, read through the final norm and head (logit lens)
            norm = final_norm(unwrapped)
            states = torch.stack([lens_cap.get(0, i)[:, 0] for i in lens_layers])  # [K,B,H]
            lens_logits = lm_head(norm(states.to(lm_head.weight.dtype)))  # [K,B,V]
            log_yes = verbal_log_probs(lens_logits, self.yes_id, self.no_id)  # [K,B]
            log_no = torch.log1p(-log_yes.exp().clamp(max=1 - 1e-6))
            y = labels.clamp(min=0).float()
            nll = -(y * log_yes + (1 - y) * log_no)  # [K,B]
            per_layer = (nll * mask).sum(dim=1) / mask.sum().clamp(min=1)
            terms["layer_verdict"] = per_layer.mean()
            for k, i in enumerate(lens_layers):
                self._metrics[mode][f"layer_verdict/layer_{i}"].append(per_layer[k].detach().item())
        verdict_logits = loop_logits(lm_head, out.loop_hidden_states, inputs["verdict_index"][:, None])[:, :, 0]
        p_yes = verbal_log_probs(verdict_logits.detach(), self.yes_id, self.no_id).exp()  # [T,B]
        # metrics over the labelled records (NaN, not logged, when a batch has none)
        per_loop["sv"] = (((p_yes > 0.5).long() == labels).float() * mask).sum(dim=1) / mask.sum()
        probes = getattr(unwrapped, "loop_probes", None)
        if probes is not None:
            probe_logits = probes(feats.detach())
            hits = ((probe_logits.detach() > 0).long() == labels).float()
            per_loop["probe_acc"] = (hits * mask).sum(dim=1) / mask.sum()
            per_loop["probe_gap"] = per_loop["probe_acc"] - per_loop["sv"]
            if w["probe"] > 0:
                per_loop["probe_loss"] = probe_loss(probe_logits, labels, mask)
                terms["probe"] = (loop_w * per_loop["probe_loss"]).sum()
            if w["consistency"] > 0:
                per_loop["consistency"] = consistency_loss(verdict_logits, probe_logits, self.yes_id, self.no_id)
                terms["consistency"] = (loop_w * per_loop["consistency"]).sum()
        if w["rr_probe"] > 0:
            per_loop["rr_probe"] = frozen_probe_loss(self.base_probes, feats, labels, mask)
            terms["rr_probe"] = (loop_w * per_loop["rr_probe"]).sum()
        if w["rr_distill"] > 0:

            def base_features():
                with torch.no_grad(), unwrapped.disable_adapter():
                    return self._readout_features(model, inputs, detach=True)[1]

            if self.base_cache is None:
                base_feats = base_features()
            else:
                base_feats = self.base_cache.features(
                    inputs["input_ids"], inputs["attention_mask"], inputs["probe_index"], base_features
                )
            per_loop["rr_distill"] = hidden_distillation_loss(feats, base_feats, self.args.rr_distill_kind)
            terms["rr_distill"] = (loop_w * per_loop["rr_distill"]).sum()
        # over ALL records: the targets are fixed probe posteriors, no label is read here. An eval
        # set without targets (they are fitted for the train set) skips the term.
        if w["probe_distill"] > 0 and "probe_target" in inputs:
            targets = inputs["probe_target"].T  # [T,B]
            if self.args.distill_kind == "pairwise":
                per_loop["probe_distill"] = probe_ranking_distillation_loss(
                    verdict_logits, targets, inputs["distill_group"], self.yes_id, self.no_id
                )
            else:
                per_loop["probe_distill"] = probe_distillation_loss(verdict_logits, targets, self.yes_id, self.no_id)
            terms["probe_distill"] = (loop_w * per_loop["probe_distill"]).sum()

        loss = sum(w[k] * v for k, v in terms.items()) if terms else feats.sum() * 0.0
        if torch.is_grad_enabled() and not loss.requires_grad:  # e.g. lm only on a batch without labels
            loss = loss + verdict_logits.float().sum() * 0.0
        metrics = self._metrics[mode]
        for k, v in terms.items():
            metrics[f"{k}_loss"].append(self.accelerator.gather_for_metrics(v.detach()).mean().item())
        for name, values in per_loop.items():
            values = self.accelerator.gather_for_metrics(values.detach()[None]).nanmean(0)
            for t, value in enumerate(values.tolist()):
                if not math.isnan(value):  # a loop not scored this step
                    metrics[f"{name}/loop_{t + 1}"].append(value)
        return (loss, out) if return_outputs else loss

    def _replay_loss(self, model, lm_head, loop_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The replay term on this step's replay batch: per-loop LM loss on the model's own answers,
        weighted over loops like ``lm``. -> (term, per-loop loss [T]). The batch is drawn by
        (seed, global step, micro-batch within the step, process), so a resumed run draws the same ones and
        gradient accumulation draws another batch for each micro-batch."""
        n = len(self.replay_features)
        step = self.state.global_step
        micro = self._replay_micro + 1 if self._replay_step == step else 0
        self._replay_step, self._replay_micro = step, micro
        draw = (self.args.seed * 1_000_003 + step) * 4099 + self.args.process_index
        # the first micro-batch draws as runs without accumulation always have
        gen = torch.Generator().manual_seed(draw if micro == 0 else draw * 131 + micro)
        picks = torch.randperm(n, generator=gen)[: min(n, self.args.replay_batch_size)].tolist()
        self.replay_picks = picks  # this micro-batch's replay records (indices into the replay dataset)
        batch = collate_replay([self.replay_features[i] for i in picks], self.processing_class.pad_token_id)
        device = loop_w.device
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with self._prefix_states(model, input_ids, attention_mask):
            out = self._loop_forward(model, input_ids, attention_mask)
        labels = batch["labels"].to(device)
        if self.args.replay_kind == "kl":
            unwrapped = self.accelerator.unwrap_model(model)

            def base_states():
                with (
                    torch.no_grad(),
                    unwrapped.disable_adapter(),
                    self._prefix_states(model, input_ids, attention_mask),
                ):
                    return self._loop_forward(model, input_ids, attention_mask).loop_hidden_states

            if self.base_cache is None:
                base = base_states()
            else:
                base = self.base_cache.sequences(input_ids, attention_mask, base_states)
            token_losses, _ = per_loop_token_kl(lm_head, out.loop_hidden_states, base, labels, self.args.lm_chunk_size)
        else:
            token_losses, _ = per_loop_token_losses(lm_head, out.loop_hidden_states, labels, self.args.lm_chunk_size)
        term, _ = weighted_loop_loss(token_losses, loop_w)
        return term, token_losses.mean(dim=1).detach()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ----- optimizer, saving, resuming -------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        probes = getattr(self.accelerator.unwrap_model(self.model), "loop_probes", None)
        if probes is not None:
            ids = {id(p) for p in probes.parameters()}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group(
                {"params": list(probes.parameters()), "lr": self.args.probe_learning_rate, "weight_decay": 0.0}
            )
        return optimizer

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL writes its own card into ``output_dir`` with each checkpoint (a model "fine-tuned from None": it
        cannot see a loopalign base); a gap-SFT run's card is loopalign's (``write_adapter_card``, in ``final/``),
        so none is written here."""
        return None

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.process_index != 0:
            return
        self.save_gap_state(output_dir)
        apply_umask_tree(output_dir)  # transformers / PEFT write weights 0600: a teammate could not read them

    def save_gap_state(self, output_dir: str) -> None:
        """Write the probes (trained and frozen base) and the gap settings, atomically."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        tensors = {}
        probes = getattr(unwrapped, "loop_probes", None)
        if probes is not None:
            tensors.update({f"loop_probes.{k}": v for k, v in probes.state_dict().items()})
        for t, probe in enumerate(self.base_probes or []):
            tensors.update(probe.state(prefix=f"base_probes.{t}."))
        if tensors:
            atomic_save_safetensors(tensors, os.path.join(output_dir, PROBES_FILE), {"num_loops": str(self.num_loops)})
        settings = {
            "num_loops": self.num_loops,
            "probe_layer": self.probe_layer,
            "probe_position": self.args.probe_position,
            "lora_loops": self.args.lora_loops,
            "loss_weights": self.weights,
            "loop_weighting": self.args.loop_weighting,
            "loop_weights": self.args.loop_weights,
            "verdict_tokens": [self.args.verdict_yes, self.args.verdict_no],
            "label_fraction": self.args.label_fraction,
            "distill_folds": self.args.distill_folds,
            "distill_position": self.args.distill_position,
            "probe_targets": self.probe_targets_summary,
            "verdict_layers": self.verdict_layer_indices,
        }
        atomic_write_text(os.path.join(output_dir, GAP_CONFIG_FILE), json.dumps(settings, indent=2))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROBES_FILE)
        if not os.path.exists(path):
            return
        state = load_file(path)
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        probes = getattr(unwrapped, "loop_probes", None)
        if probes is not None:
            probes.load_state_dict(
                {k[len("loop_probes.") :]: v for k, v in state.items() if k.startswith("loop_probes.")}
            )
