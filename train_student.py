"""Stage 2: train a standard classifier (the student) on soft targets rebuilt from a teacher cache.

    python train_student.py --cache cache/<key> --output_dir students/topics --temperature 2
    torchrun --nproc_per_node 4 train_student.py --cache ... --output_dir ...

Never loads the teacher: targets come from the cached logits, so one teacher pass serves any number of
student runs (other temperatures, single- or multi-label, other students). Every TrainingArguments field
passes through as a flag (--learning_rate, --num_train_epochs, --per_device_train_batch_size, ...).
The result loads with from_pretrained and pipeline("text-classification", model=output_dir, top_k=None).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import Trainer

from zsdistill import __version__, adapt, card, data, serving, targets
from zsdistill import refine as refine_mod  # `refine` is the CLI flag
from zsdistill import cache as teacher_cache  # `cache` is the CLI flag
from zsdistill.errors import UserError, run_cli, writing_to
from zsdistill.metrics import bootstrap_intervals, encode_labels, label_metrics
from zsdistill.options import cli, number_in, option, whole_number
from zsdistill.models import resolve_max_length
from zsdistill.targets import holdout_split

INFO_FILE = card.INFO_FILE  # written last: a student directory without it is not finished
BALANCE_METHOD = "class-balanced row sampling"
MIN_BALANCED_PRIOR = 0.1  # balanced distillation upweights a class at most as if its share of the rows were 0.1 / K
# A multi-label student calibrated on dev labels gets a temperature per class where the dev set shows the class at
# least this often present and absent (else the shared one): benchmarks/README.md, "Multi-label calibration".
MIN_DEV_PER_CLASS_CALIBRATION = 3
LENGTH_GROUP_BATCHES = 50  # group_by_length sorts this many batches at a time (transformers' LengthGroupedSampler's)
# The new head starts from random values and the body from pretrained ones: at the body's usual rates (5e-5) the head
# barely moves in 2 epochs and the student under-fits its targets, the rarer classes first (benchmarks/README.md).
HEAD_LEARNING_RATE_FACTOR = 100.0


@dataclasses.dataclass
class StudentOptions:
    """train_student.py's flags, checked once; every transformers.TrainingArguments field passes through beside them."""

    cache: str = option(help="a cache directory printed by teacher_infer.py.")
    output_dir: str = option(help="where the student (a standard Hugging Face classifier) is saved.")
    student_name_or_path: str = option("distilbert-base-uncased", "the student's base model (hub id or directory).")
    temperature: float = option(1.0, "softens (T>1) or sharpens (T<1) the teacher's distribution before training.")
    multi_label: bool = option(
        False, "multi-label targets: each class independently (entailment vs contradiction), BCE loss."
    )
    multi_class: bool | None = option(None, "the reference script's name for --multi_label (an alias).")
    refine: bool = option(
        True,
        "refine the teacher's targets without labels in the cache's text-embedding space (default; see "
        "zsdistill/refine.py); --norefine (or --refine False) trains on the teacher's targets as they are.",
    )
    refine_center: bool = option(
        True,
        "refine with the corpus mean embedding removed (default), so a generic class's centroid does not draw every "
        "text to it. --norefine_center --norefine_free_last_round give the previous release's refinement.",
    )
    refine_free_last_round: bool = option(
        True,
        "the last refinement round without the teacher anchor (default), so a class's centroid also takes in its "
        "surest texts that the teacher put elsewhere; --norefine_free_last_round anchors every round.",
    )
    refine_density_weights: bool = option(
        True,
        "weight each text in its class's centroid by 1 / how many of the class's texts sit near it (default), so a "
        "dense clump of alike texts does not take a class over; --norefine_density_weights gives the previous "
        "release's refinement.",
    )
    refine_prior_floor: bool = option(
        False,
        "opt-in, without --dev_file: hold each class's refined prior at least at the smaller of the teacher's and 0.4 "
        "of a uniform share, so refinement does not starve a small class the teacher finds (it lifts the refined "
        "targets where a class is small and diverse, measured not to carry over to the student; benchmarks/README.md).",
    )
    refine_drift_guard: bool = option(
        True,
        "without --dev_file: where refinement moves a class away from the texts the teacher is surest are in it (it "
        "keeps under a quarter of them), refine again with that class anchored to those texts (default), so a tight "
        "group of other texts cannot take the class over; --norefine_drift_guard gives the previous release's.",
    )
    refine_propagate: float = option(
        0.5,
        "spread the refined targets over each text's 10 nearest texts in refinement's space (label propagation; alpha "
        "in [0, 0.9], the neighbours' weight; default 0.5, the one measured), each class kept at its number of texts "
        "and the targets at their mean confidence; 0 gives the previous release's targets "
        '(benchmarks/README.md, "Label propagation").',
    )
    refine_starved_share: float = option(
        0.0,
        "without --dev_file: a class the refined targets starve (under a quarter of the texts the teacher gives it) is "
        "made the most likely class of this fraction of the teacher's count of texts, those nearest its centroid "
        "(in [0, 1]; default 0: none, reported only). Measured at 0.75: the student predicts such a class about as "
        'often as the teacher, at a cost of macro-F1 (benchmarks/README.md, "A starved class held at a share of the '
        "teacher's count\").",
    )
    adapt_rounds: int = option(
        0,
        "rounds of adaptation before refining (default 0: none): fine-tune the cache's embedding model on "
        "refinement's surest texts with the zero-shot loss, re-embed the texts, refine there (zsdistill/adapt.py). "
        "Cached beside the teacher cache, so a second run with the same settings trains nothing. Off by default, as it "
        'helps some tasks and hurts others (benchmarks/README.md, "Adaptation").',
    )
    adapt_fraction: float = option(
        adapt.AdaptSettings.fraction, "each refined class's surest share of texts that adaptation trains on."
    )
    adapt_mask_class_names: bool = option(
        adapt.AdaptSettings.mask_class_names,
        "remove the class names' words from those texts (Gera et al.'s token masking).",
    )
    adapt_teacher_agrees: bool = option(
        adapt.AdaptSettings.teacher_agrees,
        "train adaptation only on texts whose teacher label is their refined class (the teacher's hypotheses and the "
        "texts' neighbours agree), the surest of them up to each class's --adapt_fraction.",
    )
    adapt_dev_check: bool = option(
        True,
        "with --adapt_rounds and a --dev_file in refinement: refine in the frozen space too and keep the adapted one "
        "only where the dev labels' held-out likelihood prefers it (default); --noadapt_dev_check keeps it always.",
    )
    balance: bool | float = option(
        True,
        "balanced distillation (default): draw training rows as often as their classes are rare in the targets, so "
        "the student learns every class they teach whatever the learning rate; each row keeps its own soft target, "
        "so confidence is unchanged. --nobalance (or --balance False) draws every row once an epoch. A number in "
        "(0, 1] sets the balancing power (1, the same as True, gives every class an equal share and 0.5 shares in "
        "proportion to the square root of each class's rows).",
    )
    head_learning_rate_factor: float = option(
        HEAD_LEARNING_RATE_FACTOR,
        "the new head's learning rate as a multiple of --learning_rate (1: the head learns at the body's rate).",
    )
    calibrate: bool | None = option(
        None,
        "after training, rescale the student's logits so its confidence matches its targets on the held-out rows "
        "(one temperature folded into the classifier head; needs --holdout_fraction > 0). Default: on when "
        "refining, so --norefine alone gives the plain distillation of the reference script.",
    )
    holdout_fraction: float = option(
        0.05, "fraction of the cache held out (deterministically) to measure student-teacher agreement."
    )
    max_holdout_examples: int = option(
        10_000, "at most this many held-out rows (10,000 measure agreement to about +-1%; more only cost time)."
    )
    max_length: int | None = option(
        None, "truncate student inputs to this many tokens (default: the student's maximum)."
    )
    overwrite_output_dir: bool = option(False, "replace a non-empty output_dir instead of refusing.")
    trust_remote_code: bool = option(False, "allow models whose code lives in their hub repository.")
    dev_file: str | None = option(
        None,
        "a few labeled texts, never trained on, nor their texts where the cache holds them (the formats evaluate.py "
        "--test_file reads; single- or multi-label; a "
        "few per class up to a few thousand). Single-label: their texts join refinement's centroids and the targets' "
        "confidence is fitted on their labels (--refine_with_dev); else (or with --norefine_with_dev) the student's "
        "temperature is fitted on them (multi-label: one temperature a class). Dev accuracy, macro-F1 and ECE are "
        "measured at every evaluation step (--eval_strategy; --metric_for_best_model macro_f1 works) and at the end "
        "(distill_info.json, the card).",
    )
    refine_with_dev: bool = option(
        True,
        "with --dev_file, single-label and refining: each class's centroid moves toward its dev texts (weighted n : "
        f"{refine_mod.LABELED_PSEUDO_COUNT:g} for n dev texts of the class) and the targets' confidence is fitted on "
        "the dev labels (cross-fitted: each scored by a refinement without it); the dev metrics then come from texts "
        "that shaped the targets. --norefine_with_dev keeps the dev set for calibration and monitoring only.",
    )
    refine_dev_bias: bool = option(
        True,
        "with the dev set in refinement: each class's log prior may also move by a bias fitted on the dev labels with "
        "the confidence, correcting the class shares refinement estimated from its own labels; its strength (or none) "
        "is chosen by held-out likelihood on the dev labels. --norefine_dev_bias keeps refinement's priors (the "
        "release before).",
    )
    refine_dev_agreement: bool = option(
        True,
        "with the dev set in refinement: a dev text that the round's own centroid already places in its class counts "
        f"{refine_mod.AGREED_WEIGHT:g} of a text in that class's weight (it confirms the centroid more than it "
        "corrects it). --norefine_dev_agreement counts every dev text as one (the release before).",
    )
    dev_text_column: str = option("text", "text column of a tabular --dev_file.")
    dev_label_column: str = option(
        "label", "label column of a tabular --dev_file (a class name, or a list of names for multi-label)."
    )
    export: str | None = option(
        None,
        "`onnx`: after saving, also export the student for ONNX Runtime (onnx/model.onnx fp32 and "
        "onnx/model_quantized.onnx int8), parity-checked against it on the held-out rows (export_student.py does the "
        "same for a student trained earlier; needs pip install 'zsdistill[onnx]').",
    )

    def __post_init__(self):
        self.cache, self.output_dir, self.student_name_or_path = map(
            str, (self.cache, self.output_dir, self.student_name_or_path)
        )
        self.temperature = targets.check_temperature(self.temperature)
        if self.multi_class is not None:  # the alias
            if self.multi_label and not self.multi_class:
                raise UserError("--multi_class is an alias of --multi_label; give one of them")
            self.multi_label = bool(self.multi_class)
        self.multi_label = bool(self.multi_label)
        self.refine, self.refine_center = bool(self.refine), bool(self.refine_center)
        self.refine_free_last_round = bool(self.refine_free_last_round)
        self.refine_density_weights = bool(self.refine_density_weights)
        self.refine_prior_floor = bool(self.refine_prior_floor)
        self.refine_drift_guard = bool(self.refine_drift_guard)
        self.adapt_dev_check = bool(self.adapt_dev_check)
        self.refine_with_dev = bool(self.refine_with_dev)
        self.refine_dev_bias = bool(self.refine_dev_bias)
        self.refine_dev_agreement = bool(self.refine_dev_agreement)
        self.refine_propagate = number_in(
            self.refine_propagate, "refine_propagate", "a number in [0, 0.9] (0: none; 0.5 measured)", 0, 0.9
        )
        self.refine_starved_share = number_in(
            self.refine_starved_share, "refine_starved_share", "a number in [0, 1] (0: none)", 0, 1
        )
        try:
            self.holdout_fraction = float(self.holdout_fraction)
        except (TypeError, ValueError):
            raise UserError(
                f"--holdout_fraction {self.holdout_fraction!r} is not a number; give a value in [0, 1)"
            ) from None
        if not 0 <= self.holdout_fraction < 1:
            raise UserError(f"--holdout_fraction {self.holdout_fraction} must be in [0, 1), e.g. 0.05")
        power = 1.0 if self.balance is True else 0.0 if self.balance is False else self.balance
        if isinstance(power, str) or not 0 <= float(power) <= 1:
            raise UserError(
                f"--balance must be True, False or a balancing power in [0, 1] (1: every class equally often), got "
                f"{self.balance!r}"
            )
        factor = self.head_learning_rate_factor
        try:
            self.head_learning_rate_factor = float("nan") if isinstance(factor, (bool, str)) else float(factor)
        except (TypeError, ValueError):
            self.head_learning_rate_factor = float("nan")
        if not 0 < self.head_learning_rate_factor < float("inf"):
            raise UserError(
                f"--head_learning_rate_factor must be a positive number (1: the head learns at --learning_rate), "
                f"got {factor!r}"
            )
        whole_number(self.adapt_rounds, "adapt_rounds", "a non-negative integer (0: no adaptation)")
        if isinstance(self.adapt_fraction, (bool, str)) or not 0 < float(self.adapt_fraction) <= 1:
            raise UserError(f"--adapt_fraction must be a number in (0, 1], e.g. 0.3, got {self.adapt_fraction!r}")
        self.adapt_fraction, self.adapt_mask_class_names = float(self.adapt_fraction), bool(self.adapt_mask_class_names)
        if self.adapt_rounds and not self.refine:
            raise UserError(
                "--adapt_rounds adapts the space refinement works in; with --norefine there is none: drop one of "
                "the two"
            )
        whole_number(self.max_holdout_examples, "max_holdout_examples", "a non-negative integer")
        self.calibrate = self.refine if self.calibrate is None else bool(self.calibrate)
        if self.export is not None:
            if str(self.export).lower() != "onnx":
                raise UserError(
                    f"--export {self.export!r} is not a format this can export to; give --export onnx (ONNX Runtime, "
                    f"fp32 and int8)"
                )
            self.export = "onnx"
            serving.require_runtime(export=True)  # before training, not after it

    @property
    def balance_power(self) -> float:
        """0: no balancing; 1: every class of the targets drawn equally often."""
        return 1.0 if self.balance is True else 0.0 if self.balance is False else float(self.balance)


def log(message: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[student] {message}", file=sys.stderr, flush=True)


def holdout_metrics(student_logits: np.ndarray, teacher_targets: np.ndarray, multi_label: bool) -> dict:
    """Student-teacher agreement and soft cross-entropy on rows the student never trained on."""
    logits = student_logits.astype(np.float64)
    t = teacher_targets.astype(np.float64)
    if multi_label:
        p = 1 / (1 + np.exp(-logits))
        eps = 1e-12
        bce = -(t * np.log(p + eps) + (1 - t) * np.log(1 - p + eps)).mean()
        s_pos, t_pos = p > 0.5, t > 0.5
        tp = (s_pos & t_pos).sum()
        f1 = 2 * tp / max(s_pos.sum() + t_pos.sum(), 1)
        return {
            "agreement": float((s_pos == t_pos).mean()),
            "f1_vs_teacher": float(f1),
            "binary_cross_entropy": float(bce),
        }
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    return {
        "agreement": float((logits.argmax(-1) == t.argmax(-1)).mean()),
        "soft_cross_entropy": float(-(t * log_p).sum(-1).mean()),
        "teacher_entropy": float(-(t * np.log(np.clip(t, 1e-12, 1))).sum(-1).mean()),  # the floor of the soft CE
    }


def build_targets(
    cache_path: str,
    manifest: dict,
    multi_label: bool,
    temperature: float,
    refine: bool,
    refine_center: bool = True,
    adaptation: "adapt.AdaptSettings | None" = None,
    refine_free_last_round: bool = True,
    dev: tuple[list[str], np.ndarray] | None = None,
    refine_density_weights: bool = True,
    refine_dev_bias: bool = True,
    refine_prior_floor: bool = False,
    refine_drift_guard: bool = True,
    refine_propagate: float = 0.5,
    refine_starved_share: float = 0.0,
    adapt_dev_check: bool = True,
    refine_dev_agreement: bool = True,
) -> tuple[np.ndarray, "refine_mod.Refinement | None", dict]:
    """The (N, K) float32 targets the student trains on, the refinement that made them (or None), and its record.
    With `dev` (texts, class indices), refinement moves its centroids toward them and fits its confidence on them; with
    `adaptation` too and adapt_dev_check, the adapted space is kept only where the dev labels prefer it."""
    if not refine:
        log("refinement off (--norefine): training on the teacher's targets as they are")
        return (
            targets.cache_probabilities(cache_path, manifest, multi_label, temperature),
            None,
            {"method": None, "reason": "--norefine"},
        )
    if adaptation is not None and (multi_label or not manifest.get("text_embedding_column")):
        raise UserError(
            "--adapt_rounds adapts the embedding model that refinement uses: it needs single-label targets and a cache "
            "with text embeddings; drop --adapt_rounds (or --multi_label)"
        )
    if multi_label:
        log("refinement: not applied to multi-label targets; they are used as the teacher gives them")
        return (
            targets.cache_probabilities(cache_path, manifest, True, temperature),
            None,
            {"method": None, "reason": "multi-label targets are used as the teacher gives them"},
        )
    embedding_column = manifest.get("text_embedding_column")
    if not embedding_column:
        log(
            "refinement: the cache holds no text embeddings, so the teacher's targets are used as they are; "
            "rebuild it with teacher_infer.py without --embedding_model none (or with --embedding_model "
            "<sentence-embedding model>) to refine them"
        )
        return (
            targets.cache_probabilities(cache_path, manifest, False, temperature),
            None,
            {"method": None, "reason": "the cache holds no text embeddings"},
        )
    embedded_by = (manifest.get("embedding_model") or manifest["teacher"])["name_or_path"]
    log(f"refinement: in the text-embedding space of {embedded_by} (cached by stage 1)")
    started = time.time()
    teacher_chunks = lambda: targets.cache_probability_chunks(cache_path, manifest, False)  # noqa: E731
    frozen_chunks, frozen_fingerprint = (
        refine_mod.embedding_chunks(cache_path, manifest),
        refine_mod.embedding_fingerprint(manifest),
    )
    embedding_chunks, fingerprint, adapted = frozen_chunks, frozen_fingerprint, None
    if adaptation is not None and adaptation.rounds > 0:
        embeddings, adapted = adapt.adapted_embeddings(cache_path, manifest, adaptation, teacher_chunks, log)
        embedding_chunks = lambda: iter([(0, embeddings)])  # noqa: E731
        # A refinement fitted here applies only to texts embedded by the adapted encoder.
        fingerprint = f"adapted:{adapted['key']}"

    def refined_in(chunks, encoder: str | None):
        labeled = None if dev is None else refine_mod.LabeledTexts(embed_dev_texts(manifest, dev[0], encoder), dev[1])
        return refine_mod.refine(
            teacher_chunks,
            chunks,
            manifest["num_examples"],
            len(manifest["class_names"]),
            temperature,
            log,
            center=refine_center,
            free_last_round=refine_free_last_round,
            labeled=labeled,
            density_weights=refine_density_weights,
            dev_bias=refine_dev_bias,
            prior_floor=refine_prior_floor,
            drift_guard=refine_drift_guard,
            propagate=refine_propagate,
            starved_share=refine_starved_share,
            dev_agreement=refine_dev_agreement,
        )

    refined, refinement = refined_in(
        embedding_chunks, os.path.join(adapted["directory"], adapt.ENCODER) if adapted else None
    )
    if adapted and dev is not None and adapt_dev_check:
        # The dev labels say whether the adapted space serves this task: a round helps where texts cluster by class
        # and costs where they do not, which no label-free figure tells apart (benchmarks/README.md, "Adaptation").
        frozen, frozen_refinement = refined_in(frozen_chunks, None)
        nll = {"adapted": refinement.dev_held_out_nll, "frozen": frozen_refinement.dev_held_out_nll}
        kept = nll["adapted"] < nll["frozen"]
        adapted["dev_check"] = {"held_out_nll": {k: round(v, 6) for k, v in nll.items()}, "kept": kept}
        log(
            f"adaptation: the {len(dev[1])} dev labels' held-out likelihood prefers the "
            f"{'adapted' if kept else 'frozen'} space (-log p per dev label {nll['adapted']:.4f} adapted, "
            f"{nll['frozen']:.4f} frozen): refining in it"
        )
        if not kept:
            refined, refinement, fingerprint = frozen, frozen_refinement, frozen_fingerprint
        del frozen, frozen_refinement
    info = {**refinement.settings(), "embedding_fingerprint": fingerprint, "seconds": round(time.time() - started, 3)}
    if adapted:
        info["adaptation"] = adapted
    log(
        f"refinement ({refine_mod.METHOD}): {refinement.rounds} rounds in {info['seconds']:.1f}s; "
        f"its labels agree with the teacher's on {refinement.agreement_with_teacher:.1%} of the texts"
    )
    return refined, refinement, info


def embed_dev_texts(manifest: dict, texts: list[str], encoder: str | None = None) -> np.ndarray:
    """The dev texts embedded by the model that embedded the cache's texts (or by the adapted `encoder`): (n, H)."""
    from zsdistill import inference, models
    from zsdistill import teacher as zs_teacher

    described = manifest.get("embedding_model") or manifest["teacher"]
    if encoder is None:
        embedder = zs_teacher.resolve_teacher(described["name_or_path"], kind="embedding")
        if embedder.fingerprint != described["fingerprint"]:
            raise UserError(
                f"--dev_file: the embedding model {described['name_or_path']!r} is not the one that embedded the "
                f"cache's texts (fingerprint {embedder.fingerprint} vs {described['fingerprint']}); restore it, or "
                f"pass --norefine_with_dev to keep the dev set out of refinement"
            )
    else:
        embedder = zs_teacher.Teacher(described["name_or_path"], encoder, described["fingerprint"], "embedding")
    started = time.time()
    model, tokenizer = zs_teacher.load_model(embedder, models.select_device())  # as stage 1 loaded it
    max_length = models.resolve_max_length(tokenizer, model, None)
    embeddings = inference.embed(model, tokenizer, texts, max_length, 64, 16_384, described.get("pooling") or "mean")
    log(f"dev set: {len(texts)} texts embedded by {described['name_or_path']} in {time.time() - started:.1f}s")
    return embeddings


def teacher_classes(cache_path: str, manifest: dict, rows: np.ndarray) -> np.ndarray:
    """The raw teacher's predicted class (single-label, T = 1) of each of `rows`, read shard by shard."""
    found = np.empty(len(rows), dtype=np.int64)
    for start, probabilities in targets.cache_probability_chunks(cache_path, manifest, False):
        here = (rows >= start) & (rows < start + len(probabilities))
        found[here] = probabilities[rows[here] - start].argmax(1)
    return found


def compare_with_the_teacher(holdout: dict, holdout_targets: np.ndarray, teacher: np.ndarray, steps: int) -> None:
    """Refined targets: beside the student's agreement with them on the held-out rows, the raw teacher's (`teacher`:
    its classes there). A student below the teacher has learned less of its targets than the teacher already knows,
    usually too few optimizer steps (benchmarks/README.md, "Students on a small corpus")."""
    holdout["teacher_agreement"] = float((teacher == holdout_targets.argmax(1)).mean())
    holdout["below_teacher"] = holdout["agreement"] < holdout["teacher_agreement"]
    if holdout["below_teacher"]:
        log(
            f"warning: the student agrees with its targets on {holdout['agreement']:.1%} of the {len(teacher)} "
            f"held-out texts, the raw teacher on {holdout['teacher_agreement']:.1%}: it has learned less of them than "
            f"the teacher already knows ({steps} optimizer steps); train longer (--num_train_epochs, --max_steps) or "
            "at a higher --learning_rate"
        )


def fit_logit_temperature(student_logits: np.ndarray, soft_targets: np.ndarray, multi_label: bool) -> float:
    """The T that makes the student's probabilities softmax(z / T) (sigmoid for multi-label) closest to its
    targets on held-out rows, by cross-entropy. Label-free: it matches the student to what it was taught."""
    from scipy.optimize import minimize_scalar

    z, t = student_logits.astype(np.float64), soft_targets.astype(np.float64)

    def loss(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        if multi_label:
            return float((np.logaddexp(0, scaled) - t * scaled).mean())  # BCE with logits
        scaled = scaled - scaled.max(1, keepdims=True)
        return float(-(t * (scaled - np.log(np.exp(scaled).sum(1, keepdims=True)))).sum(1).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def per_class_temperatures(student_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Multi-label: per class, the T that makes sigmoid(z / T) closest to the dev labels of that class (K,); a class
    the dev set shows present or absent fewer than MIN_DEV_PER_CLASS_CALIBRATION times gets the shared T."""
    present = labels.sum(0)
    own = np.minimum(present, len(labels) - present) >= MIN_DEV_PER_CLASS_CALIBRATION
    shared = None if own.all() else fit_logit_temperature(student_logits, labels, True)
    return np.array(
        [
            fit_logit_temperature(student_logits[:, [k]], labels[:, [k]], True) if own[k] else shared
            for k in range(labels.shape[1])
        ]
    )


def scale_classifier(model, num_labels: int, factor: float | np.ndarray) -> None:
    """Multiply the model's logits by `factor` (one number, or one a class) by scaling its last Linear layer onto the
    labels (weight rows and bias)."""
    import torch

    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise RuntimeError("no Linear layer onto the labels found in the student")
    factor = torch.as_tensor(np.asarray(factor, dtype=np.float32), device=heads[-1].weight.device)
    with torch.no_grad():
        heads[-1].weight.mul_(factor.reshape(-1, 1) if factor.ndim else factor)
        if heads[-1].bias is not None:
            heads[-1].bias.mul_(factor)


class CompactRandomSampler:
    """A random order of the training rows, new each epoch, without torch RandomSampler's Python list of every
    index (36 bytes a row; 4 here). Seeded by --seed and the epoch alone, so every rank of a torchrun job draws
    the same order (as accelerate's seedable sampler does). With `lengths` (--train_sampling_strategy
    group_by_length) the order is cut into megabatches of LENGTH_GROUP_BATCHES batches, each sorted longest first,
    as transformers' LengthGroupedSampler does: a batch pads to texts of about its own length."""

    def __init__(self, num_rows: int, seed: int, lengths: np.ndarray | None = None, batch_size: int = 1):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def __len__(self) -> int:
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls this before each epoch
        self.epoch = epoch

    def __iter__(self):
        order = self.draw()
        if self.lengths is not None:
            size = LENGTH_GROUP_BATCHES * self.batch_size
            megabatches = np.split(order, range(size, len(order), size))
            order = np.concatenate([m[np.argsort(-self.lengths[m], kind="stable")] for m in megabatches])
        yield from map(int, order)

    def draw(self) -> np.ndarray:
        import torch

        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=generator).numpy().astype(np.int32)


class BalancedRandomSampler(CompactRandomSampler):
    """len(weights) draws with replacement, row i with probability weights[i] / sum(weights); new each epoch,
    seeded by --seed and the epoch alone (every rank draws the same rows)."""

    def __init__(self, weights: np.ndarray, seed: int, lengths: np.ndarray | None = None, batch_size: int = 1):
        super().__init__(len(weights), seed, lengths, batch_size)
        self.probabilities = weights / weights.sum()

    def draw(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.choice(self.num_rows, size=self.num_rows, p=self.probabilities).astype(np.int32)


def class_balanced_weights(soft_targets: np.ndarray, rows: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Per training row, how often balanced distillation draws it: (rows of its class) ** -power, mean 1.

    A row's class is its targets' most likely one (no label is read), so every class the targets teach gets an
    equal share of the draws: a class of 1% gets as many gradient steps as one of 30%. Rows, not labels, are
    reweighted: each drawn row keeps its own soft target, so the student's best fit is still the targets
    themselves and its confidence stays theirs. power 1 gives every class the same share of the draws, 0.5 shares
    in proportion to the square root of the class's rows, 0 the plain shares.
    """
    num_classes = soft_targets.shape[1]
    predicted = np.empty(len(rows), dtype=np.int32)
    for start in range(0, len(rows), 65_536):  # chunked: soft_targets[rows] would copy (N, K)
        predicted[start : start + 65_536] = soft_targets[rows[start : start + 65_536]].argmax(1)
    counts = np.bincount(predicted, minlength=num_classes).astype(np.float64)
    # Floored at a tenth of a uniform share: a class of a handful of rows is not repeated a tenth of every batch.
    counts = np.maximum(counts, MIN_BALANCED_PRIOR * len(rows) / num_classes)
    weights = counts[predicted] ** -float(power)
    return weights / weights.mean()


class RowSubset:
    """Rows `rows` of the (memory-mapped) tokenized texts with their targets, a map-style dataset for the Trainer."""

    def __init__(self, tokenized, soft_targets: np.ndarray, rows: np.ndarray):
        self.tokenized, self.soft_targets, self.rows = tokenized, soft_targets, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        return {**self.tokenized[row], "labels": np.array(self.soft_targets[row])}

    def lengths(self) -> np.ndarray:
        """Tokens of each row's text, read from the Arrow column's offsets (no token is copied)."""
        import pyarrow.compute as pc

        column = self.tokenized.data.column("input_ids")
        return pc.list_value_length(column).to_numpy(zero_copy_only=False)[self.rows]


def held_out_dataset(tokenized_files: list[str], shards: list[dict], rows: np.ndarray, holdout_targets: np.ndarray):
    """The held-out rows' tokens and targets as a small in-memory dataset, read with plain file reads.

    The held-out rows are spread over the whole cache; reading them through the memory map would fault in
    nearly every page of the tokenized files, and keep them in the process's resident memory.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc
    from datasets import Dataset
    from datasets.table import InMemoryTable

    pieces = []
    for path, shard in zip(tokenized_files, shards):
        first, last = np.searchsorted(rows, [shard["start"], shard["stop"]])
        if last > first:
            with pa.OSFile(path) as f:
                table = ipc.open_stream(f).read_all()
            pieces.append(table.take(pa.array(rows[first:last] - shard["start"])))
    if not pieces:
        return None
    table = pa.concat_tables(pieces)
    return Dataset(InMemoryTable(table.append_column("labels", teacher_cache.list_array(holdout_targets))))


def tokenized_cache_dir(cache_path: str, key: str) -> str:
    """`<cache>/tokenized`, or `~/.cache/zsdistill/tokenized/<key>` when the cache directory is read-only (a shared
    cache)."""
    preferred = os.path.join(cache_path, "tokenized")
    try:
        os.makedirs(preferred, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = os.path.join(os.path.expanduser("~"), ".cache", "zsdistill", "tokenized", key)
    os.makedirs(fallback, exist_ok=True)
    return fallback


def _check_output_dir(output_dir: str, overwrite: bool) -> str | None:
    """Refuse a non-empty output_dir unless overwriting; return a checkpoint to resume from, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    if not os.path.isdir(output_dir) or not os.listdir(output_dir) or overwrite:
        return None
    checkpoint = get_last_checkpoint(output_dir)
    if checkpoint and not os.path.exists(os.path.join(output_dir, INFO_FILE)):
        return checkpoint
    raise UserError(
        f"--output_dir {output_dir!r} exists and is not empty; pass --overwrite_output_dir to replace it, or choose "
        f"another directory"
    )


def _publish(staging: str, output_dir: str) -> None:
    """Move the finished student into output_dir; config.json and the info file go last, so a crash
    midway never leaves a directory that loads as a model."""
    names = sorted(os.listdir(staging), key=lambda n: (n == "config.json", n == INFO_FILE))
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        source = os.path.join(staging, name)
        if os.path.isfile(source):
            os.chmod(source, 0o644)  # staging files may be private; the student is meant to be shared
        os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)


def load_student_base(name_or_path: str, class_names: list[str], multi_label: bool, trust_remote_code: bool):
    """The student's tokenizer, its base model with a new K-way head, and the names of the parameters the
    checkpoint did not hold (the new head: they start from random values)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path,
            num_labels=len(class_names),
            id2label=dict(enumerate(class_names)),
            label2id={name: i for i, name in enumerate(class_names)},
            problem_type="multi_label_classification" if multi_label else "single_label_classification",
            ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"student {name_or_path!r}: cannot load it ({str(e).splitlines()[0]}); check the name or path"
        ) from None
    new_parameters = set(loading_info.get("missing_keys", ())) | {
        key for key, *_ in loading_info.get("mismatched_keys", ())
    }
    return tokenizer, model, new_parameters


def tokenize_cache(cache_path: str, manifest: dict, tokenizer, max_length: int, args):
    """The cache's texts tokenized, shard by shard into `tokenized/<tokenizer digest>-<shard>.arrow` (memory-mapped);
    a later run with the same tokenizer and max_length reuses the files. Returns (dataset, its files, how many texts
    were cut at max_length)."""
    from datasets import Dataset, concatenate_datasets

    tokenizer_digest = hashlib.sha256(
        (tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)).encode()
        + f"|{max_length}|{type(tokenizer).__name__}".encode()
    ).hexdigest()[:16]
    tokenized_dir = tokenized_cache_dir(cache_path, manifest["key"])
    # Shard by shard, each into its own cache file: a shard's memory-mapped texts are released before the next,
    # so memory stays flat however large the cache.
    tokenized_files = [
        os.path.join(tokenized_dir, f"{tokenizer_digest}-{i:05d}.arrow") for i in range(len(manifest["shards"]))
    ]
    reused, started = all(os.path.exists(f) for f in tokenized_files), time.time()
    parts = []
    with args.main_process_first(desc="tokenizing"):
        for i, (shard, tokenized_file) in enumerate(zip(manifest["shards"], tokenized_files)):
            shard_texts = Dataset.from_file(os.path.join(cache_path, shard["file"])).select_columns(["text"])
            parts.append(
                shard_texts.map(
                    lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                    batched=True,
                    remove_columns=["text"],
                    cache_file_name=tokenized_file,
                    # One Arrow record batch per shard: reading a file's batches through its memory map faults in the
                    # pages around each batch's header, which for datasets' 1,000-row batches was half the file.
                    batch_size=max(shard["rows"], 1),
                    writer_batch_size=max(shard["rows"], 1),
                    desc=f"tokenizing shard {i + 1}/{len(tokenized_files)}",
                )
            )
            del shard_texts
    log(
        f"tokenized in {time.time() - started:.1f}s"
        + (" (reused the tokenization cache)" if reused else f" (cached in {tokenized_dir})")
    )
    # Texts the student reads only the beginning of: those at the limit whose full tokenization is longer.
    truncated = 0
    for shard, part in zip(manifest["shards"], parts):
        at_limit = np.flatnonzero(
            pc.list_value_length(part.data.column("input_ids")).to_numpy(zero_copy_only=False) >= max_length
        )
        if len(at_limit):
            texts = (
                Dataset.from_file(os.path.join(cache_path, shard["file"]))
                .data.column("text")
                .take(at_limit)
                .to_pylist()
            )
            truncated += sum(
                len(ids) > max_length
                for ids in tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"]
            )
    log(
        f"long texts: {truncated} of {manifest['num_examples']} ({truncated / max(manifest['num_examples'], 1):.1%}) "
        f"are longer than the "
        f"student's {max_length} tokens and were cut"
        + (
            f" (the teacher cut {manifest['truncated_texts']} at its {manifest['max_length']})"
            if manifest.get("truncated_texts") is not None
            else ""
        )
    )
    return concatenate_datasets(parts), tokenized_files, truncated


class DistillationTrainer(Trainer):
    """The Trainer with three hooks of ours: the loss against soft targets, the order the rows are drawn in, and
    the learning rate of the new head."""

    def __init__(
        self,
        *args,
        multi_label: bool,
        sample_weights: np.ndarray | None = None,
        new_parameters: set[str] = frozenset(),
        head_learning_rate_factor: float = 1.0,
        **kwargs,
    ):
        from transformers import DataCollatorWithPadding

        kwargs.setdefault("data_collator", DataCollatorWithPadding(kwargs["processing_class"]))
        super().__init__(*args, **kwargs)
        self.multi_label, self.sample_weights = multi_label, sample_weights
        self.new_parameters, self.head_learning_rate_factor = new_parameters, head_learning_rate_factor

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the parameters the checkpoint did not hold (the new head) moved into
        groups of their own at head_learning_rate_factor times the learning rate. Created before the scheduler,
        so the schedule scales both rates alike."""
        optimizer = super().create_optimizer(model)
        if self.head_learning_rate_factor == 1.0 or not self.new_parameters:
            return optimizer
        new = {id(p) for name, p in (model or self.model).named_parameters() if name in self.new_parameters}
        for group in list(optimizer.param_groups):
            head = [p for p in group["params"] if id(p) in new]
            if head:
                group["params"] = [p for p in group["params"] if id(p) not in new]
                if not group["params"]:
                    optimizer.param_groups.remove(group)
                optimizer.add_param_group(
                    {
                        **{k: v for k, v in group.items() if k != "params"},
                        "params": head,
                        "lr": group["lr"] * self.head_learning_rate_factor,
                    }
                )
        return optimizer

    def _get_train_sampler(self, train_dataset=None):
        strategy = self.args.train_sampling_strategy
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        if strategy not in ("random", "group_by_length"):
            return super()._get_train_sampler(train_dataset)
        # group_by_length keeps the rows drawn (balanced or not) and only orders them, so batches pad less.
        grouped = strategy == "group_by_length"
        lengths = train_dataset.lengths() if grouped else None
        batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        if self.sample_weights is not None:
            return BalancedRandomSampler(self.sample_weights, self.args.seed, lengths, batch_size)
        return CompactRandomSampler(len(train_dataset), self.args.seed, lengths, batch_size)

    def _get_eval_sampler(self, eval_dataset):
        # Rows in their order whatever the training order (transformers groups these by length too under
        # group_by_length): calibration and the dev metrics match predictions to their rows' targets.
        import torch

        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        soft = inputs["labels"].float()
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs.logits.float()
        if self.multi_label:
            # Each class is its own yes/no question: BCE against the teacher's per-class probability.
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft)
        else:
            loss = -(soft * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        return (loss, outputs) if return_outputs else loss


def calibrate_on_holdout(
    trainer,
    holdout_dataset,
    holdout_targets: np.ndarray,
    multi_label: bool,
    calibrate: bool,
    dev_set=None,
    dev_in_targets: bool = False,
) -> tuple[dict, dict]:
    """Predict the held-out rows (and the dev set); when calibrating, fold into the head the temperature that
    matches the dev labels (with a --dev_file; one a class for a multi-label student) or else the targets on the
    held-out rows. Returns (calibration record, metrics). dev_in_targets: the dev labels already set the targets'
    confidence (refinement fitted it on them, cross-fitted) and their texts moved the centroids, so the student is
    fitted to its targets: its logits on the dev texts would be over-confident to fit on (they sit closer to their own
    centroids than new texts do)."""
    metrics_found, logit_scale, fitted_on = {}, 1.0, None
    # The dev labels, unless they already set the targets' confidence and there are held-out rows to match instead.
    fit_on_dev = dev_set is not None and (not dev_in_targets or holdout_dataset is None)
    dev_logits = trainer.predict(dev_set).predictions if dev_set is not None else None
    dev_labels = np.array(dev_set["labels"], dtype=np.float32) if dev_set is not None else None
    holdout_logits = trainer.predict(holdout_dataset).predictions if holdout_dataset is not None else None
    if calibrate and (dev_set is not None or holdout_dataset is not None):
        fitted_on = "dev labels" if fit_on_dev else "held-out targets"
        logits, taught = (dev_logits, dev_labels) if fit_on_dev else (holdout_logits, holdout_targets)
        if multi_label and fit_on_dev:  # one temperature a class: benchmarks/README.md, "Multi-label calibration"
            logit_scale = 1.0 / per_class_temperatures(logits, taught)
            scaled = f"per class by {logit_scale.min():.3f} to {logit_scale.max():.3f}"
        else:
            logit_scale = 1.0 / fit_logit_temperature(logits, taught, multi_label)
            scaled = f"by {logit_scale:.3f}"
        scale_classifier(trainer.model, trainer.model.config.num_labels, logit_scale)
        log(f"calibration: logits scaled {scaled} to match the {fitted_on}")
    elif calibrate:
        log("calibration: skipped (no held-out rows; --holdout_fraction 0)")
    if holdout_dataset is not None:
        if fitted_on:
            metrics_found["holdout_before_calibration"] = holdout_metrics(holdout_logits, holdout_targets, multi_label)
        found = holdout_metrics(holdout_logits * logit_scale, holdout_targets, multi_label)
        metrics_found["holdout"] = {"examples": int(len(holdout_targets)), **found}
        log(f"holdout ({len(holdout_targets)} examples): " + ", ".join(f"{k} {v:.4f}" for k, v in found.items()))
    if dev_set is not None:
        names = [trainer.model.config.id2label[i] for i in range(trainer.model.config.num_labels)]
        if fitted_on:
            metrics_found["dev_before_calibration"] = dev_metrics(dev_logits, dev_labels, names, multi_label)
        found = dev_metrics(dev_logits * logit_scale, dev_labels, names, multi_label, intervals=True)
        metrics_found["dev"] = {"examples": len(dev_labels), **found}
        interval = found.pop("interval_95")
        log(
            f"dev ({len(dev_labels)} labeled texts): "
            + ", ".join(f"{k} {v:.4f}" for k, v in found.items())
            + "; 95% intervals: "
            + ", ".join(f"{k} {v[0]:.3f}-{v[1]:.3f}" for k, v in interval.items() if k != "resamples")
        )
    per_class = np.ndim(logit_scale) == 1
    calibration = {
        "logit_scale": [float(v) for v in logit_scale] if per_class else logit_scale,
        "applied": bool(np.any(np.asarray(logit_scale) != 1.0)),
        "fitted_on": fitted_on,
    }
    if per_class:
        calibration["per_class"] = True
    if dev_set is not None:
        calibration["dev_examples"] = len(dev_labels)
        calibration["dev_in_targets"] = dev_in_targets
    return calibration, metrics_found


def save_student(trainer, output_dir: str, info: dict, refinement) -> None:
    """The model, tokenizer, refinement, distill_info.json and model card, published into output_dir atomically."""
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=output_dir)
    try:
        trainer.save_model(staging)
        if refinement is not None:
            refine_mod.save(refinement, os.path.join(staging, refine_mod.FILE))
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        card.write(staging, info)  # README.md: the model card the hub shows
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # e.g. a full disk: no half-written student is left behind
        raise
    _publish(staging, output_dir)


def export_onnx(output_dir: str, table, holdout_rows: np.ndarray, train_rows: np.ndarray) -> None:
    """The saved student, exported for ONNX Runtime and checked on the held-out texts (the training texts if none)."""
    rows, source = (
        (holdout_rows, "held-out texts of its cache") if len(holdout_rows) else (train_rows, "training texts")
    )
    texts = serving.parity_texts(table, rows)
    try:
        with writing_to(output_dir, "the ONNX export", "free space there; nothing half-written was left"):
            serving.export_student(output_dir, texts, source, log)
    except UserError as e:
        raise UserError(
            f"the student is saved in {output_dir}, but its export failed: {e}; retry with python export_student.py "
            f"--model {output_dir}"
        ) from None


def read_dev_set(options: StudentOptions, class_names: list[str]) -> tuple[list[str], np.ndarray] | None:
    """The --dev_file's texts and labels (class indices, or a 0/1 matrix for multi-label); unknown labels refused."""
    if not options.dev_file:
        return None
    texts, labels = data.read_labeled(options.dev_file, options.dev_text_column, options.dev_label_column)
    true = encode_labels(labels, class_names, options.multi_label, options.dev_file)
    counts = true.sum(0) if options.multi_label else np.bincount(true, minlength=len(class_names))
    log(
        f"dev set {options.dev_file}: {len(texts)} labeled texts, {counts.min()} to {counts.max()} a class; the "
        f"student never trains on them"
    )
    if not options.multi_label and card.same_count_per_class(counts):
        log(
            f"dev set: {counts.min()} of every class, so it shows nothing of how common each class is; class priors "
            "fitted on it lean toward equal shares (docs/student.md: a random sample of your texts carries their "
            "shares)"
        )
    return texts, true


def dev_dataset(dev: tuple[list[str], np.ndarray], tokenizer, max_length: int, num_classes: int, multi_label: bool):
    """The dev texts tokenized, their labels one-hot (multi-hot) floats, as the Trainer's eval_dataset."""
    from datasets import Dataset

    texts, true = dev
    labels = true.astype(np.float32) if multi_label else np.eye(num_classes, dtype=np.float32)[true]
    return Dataset.from_dict({**tokenizer(texts, truncation=True, max_length=max_length), "labels": labels.tolist()})


def dev_metrics(
    logits: np.ndarray, one_hot: np.ndarray, class_names: list[str], multi_label: bool, intervals: bool = False
) -> dict:
    """Accuracy (subset accuracy and micro-F1 for multi-label), macro-F1 and ECE of logits against dev labels; with
    `intervals`, also accuracy's and macro-F1's 95% bootstrap intervals (`interval_95`): a few labels move a lot."""
    true = one_hot.astype(np.int64) if multi_label else one_hot.argmax(1)
    probabilities = serving.probabilities(logits, multi_label)
    found = label_metrics(true, probabilities, class_names, multi_label)
    found = {k: v for k, v in found.items() if isinstance(v, float)}
    return {**found, "interval_95": bootstrap_intervals(true, probabilities, multi_label)} if intervals else found


def training_arguments(options: StudentOptions, extra: dict):
    """The transformers.TrainingArguments of this run: every flag that is not a StudentOptions field."""
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise UserError(
            f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join('--' + u for u in unknown)}: neither a "
            f"train_student.py flag nor a transformers.TrainingArguments field (see python train_student.py --help)"
        )
    try:
        return TrainingArguments(output_dir=options.output_dir, **{"report_to": "none", **extra})
    except (ValueError, TypeError, ImportError) as e:
        raise UserError(f"invalid training arguments: {e}") from None


def load_inputs(options: StudentOptions) -> tuple[dict, object, np.ndarray, np.ndarray, tuple | None]:
    """The verified cache (manifest, Arrow table), refused when single-label training cannot use it, its rows split
    into training and held-out ones, and the --dev_file's texts and labels (None without one)."""
    manifest, table = teacher_cache.load_cache(options.cache)
    class_names = manifest["class_names"]
    if not options.multi_label and len(class_names) < 2:
        raise UserError(
            f"single-label training needs at least 2 classes; the cache has {len(class_names)} ({class_names[0]!r}); "
            f"pass --multi_label or rebuild the cache with more class names"
        )
    dev = read_dev_set(options, class_names)
    train_rows, holdout_rows = holdout_split(
        manifest["num_examples"], options.holdout_fraction, options.max_holdout_examples
    )
    if dev is not None:  # a dev set drawn from the corpus itself: its texts are not trained on, even without labels
        in_dev = pc.is_in(table.column("text"), value_set=pa.array(dev[0], pa.string())).to_numpy(zero_copy_only=False)
        dev_rows = np.flatnonzero(in_dev)
        if len(dev_rows):
            train_rows = np.setdiff1d(train_rows, dev_rows).astype(train_rows.dtype)
            log(f"dev set: {len(dev_rows)} cache rows hold its texts; they are left out of training")
    log(
        f"cache {manifest['key']}: {manifest['num_examples']} examples x {len(class_names)} classes; "
        f"{len(train_rows)} train, {len(holdout_rows)} held out; T={options.temperature}, "
        f"{'multi' if options.multi_label else 'single'}-label"
    )
    return manifest, table, train_rows, holdout_rows, dev


def targets_for(options: StudentOptions, manifest: dict, seed: int, dev: tuple | None = None):
    """build_targets with this run's options: (targets, refinement or None, its record)."""
    started = time.time()
    adaptation = None
    if options.adapt_rounds:
        adaptation = adapt.AdaptSettings(
            rounds=options.adapt_rounds,
            fraction=options.adapt_fraction,
            mask_class_names=options.adapt_mask_class_names,
            teacher_agrees=options.adapt_teacher_agrees,
            seed=seed,
            refine_center=options.refine_center,
            refine_free_last_round=options.refine_free_last_round,
            refine_density_weights=options.refine_density_weights,
            refine_drift_guard=options.refine_drift_guard,
        )
    built = build_targets(
        options.cache,
        manifest,
        options.multi_label,
        options.temperature,
        options.refine,
        options.refine_center,
        adaptation,
        options.refine_free_last_round,
        dev if options.refine_with_dev and not options.multi_label else None,
        options.refine_density_weights,
        options.refine_dev_bias,
        options.refine_prior_floor,
        options.refine_drift_guard,
        options.refine_propagate,
        options.refine_starved_share,
        options.adapt_dev_check,
        options.refine_dev_agreement,
    )
    log(f"targets built in {time.time() - started:.1f}s")
    return built


def student_inputs(options: StudentOptions, manifest: dict, args):
    """The student's base (tokenizer, model, new parameters), the cache's texts tokenized for it (cached beside the
    cache for later runs), its maximum length and how many texts it cuts."""
    from transformers.trainer_utils import enable_full_determinism, set_seed

    # The new K-way head is initialised from the global RNG: seed it first, or --seed would not make runs repeatable.
    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
    tokenizer, model, new_parameters = load_student_base(
        options.student_name_or_path, manifest["class_names"], options.multi_label, options.trust_remote_code
    )
    max_length = resolve_max_length(tokenizer, model, options.max_length)
    directory = tokenized_cache_dir(options.cache, manifest["key"])
    with writing_to(
        directory, "the tokenized texts", "free space there; the teacher cache itself is complete and untouched"
    ):
        tokenized, files, truncated_texts = tokenize_cache(options.cache, manifest, tokenizer, max_length, args)
    return tokenizer, model, new_parameters, tokenized, files, max_length, truncated_texts


def balanced_weights(options: StudentOptions, soft_targets: np.ndarray, train_rows: np.ndarray) -> np.ndarray | None:
    if not options.balance_power:
        return None
    if options.multi_label:
        log("balanced distillation: not applied to multi-label targets (classes are independent yes/no questions)")
        return None
    power = options.balance_power
    weights = class_balanced_weights(soft_targets, train_rows, power)
    log(
        f"balanced distillation (power {power:g}): the targets' classes drawn "
        f"{'equally often' if power == 1 else 'closer to equally often'} (row weights {weights.min():.2f} to "
        f"{weights.max():.2f}); --nobalance draws every row once an epoch"
    )
    return weights


def distillation_trainer(
    options: StudentOptions, args, model, tokenizer, train_dataset, new_parameters: set, dev_set=None
):
    """The Trainer that distils: soft-target loss, class-balanced row draws, the new head at its own rate; with a
    dev set, its metrics at every evaluation step."""
    sample_weights = balanced_weights(options, train_dataset.soft_targets, train_dataset.rows)
    names, multi = [model.config.id2label[i] for i in range(model.config.num_labels)], options.multi_label
    if new_parameters:
        log(
            f"new head ({', '.join(sorted(new_parameters))}): learning rate {options.head_learning_rate_factor:g} x "
            f"{args.learning_rate:g} (--head_learning_rate_factor; 1 trains it at the body's rate)"
        )
    return DistillationTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        multi_label=options.multi_label,
        sample_weights=sample_weights,
        new_parameters=new_parameters,
        head_learning_rate_factor=options.head_learning_rate_factor,
        eval_dataset=dev_set,
        compute_metrics=None if dev_set is None else lambda p: dev_metrics(p.predictions, p.label_ids, names, multi),
    )


def distill_info(
    options: StudentOptions,
    manifest: dict,
    args,
    refinement,
    refinement_info: dict,
    *,
    sample_weights: np.ndarray | None,
    new_parameters: set,
    calibration: dict,
    **results,
) -> dict:
    """distill_info.json: every option (asdict), what the cache was, and what the run measured and decided."""
    applied = sample_weights is not None
    return {
        "zsdistill_version": __version__,
        **dataclasses.asdict(options),
        "cache": os.path.abspath(options.cache),
        "cache_key": manifest["key"],
        "cache_summary": {
            "teacher": manifest["teacher"]["name_or_path"],
            "teacher_fingerprint": manifest["teacher"]["fingerprint"],
            "teacher_kind": manifest["teacher"]["kind"],
            "hypothesis_template": manifest["hypothesis_template"],
            "class_names": manifest["class_names"],
            "num_examples": manifest["num_examples"],
            "precision": manifest.get("precision"),
            "data_fingerprint": manifest["data"]["fingerprint"],
            "embedding_model": (manifest.get("embedding_model") or {}).get("name_or_path"),
        },
        "teacher": manifest["teacher"]["name_or_path"],
        "student_base": options.student_name_or_path,
        "similarity_scale": targets.SIMILARITY_SCALE if manifest["teacher"]["kind"] == "embedding" else None,
        "refinement": {**refinement_info, "file": refine_mod.FILE if refinement else None},
        "balance": {
            "applied": applied,
            "method": BALANCE_METHOD if applied else None,
            "power": options.balance_power if applied else None,
            "min_prior": MIN_BALANCED_PRIOR if applied else None,
        },
        "head_learning_rate": {"factor": options.head_learning_rate_factor, "parameters": sorted(new_parameters)},
        "calibration": calibration,
        "export": None,  # export_student / --export onnx records its files here
        "training_arguments": json.loads(args.to_json_string()),
        **results,  # max_length (the student's, resolved), truncated_texts, metrics
    }


def train(options: StudentOptions, extra: dict) -> str:
    """Train a student classifier on soft targets from a teacher cache."""
    # 1. Flags checked (StudentOptions), the training arguments built, the output directory free or resumable.
    args = training_arguments(options, extra)
    resume_from = _check_output_dir(options.output_dir, options.overwrite_output_dir)

    # 2. The cache: verified, then turned into soft targets. The teacher is never loaded.
    manifest, table, train_rows, holdout_rows, dev = load_inputs(options)
    soft_targets, refinement, refinement_info = targets_for(options, manifest, args.seed, dev)

    # 3. The student's base model, and the cache's texts tokenized once per student tokenizer (reused by later runs).
    tokenizer, model, new_parameters, tokenized, files, max_length, truncated_texts = student_inputs(
        options, manifest, args
    )
    holdout_targets = soft_targets[holdout_rows]
    # Not tokenized.select(rows): datasets turns the row indices into a Python list (tens of MB per million rows).
    # The targets stay one (N, K) float32 array in memory: memory-mapped, every page would end up resident anyway.
    train_dataset = RowSubset(tokenized, soft_targets, train_rows)
    holdout_dataset = held_out_dataset(files, manifest["shards"], holdout_rows, holdout_targets)
    dev_set = dev and dev_dataset(dev, tokenizer, max_length, len(manifest["class_names"]), options.multi_label)

    # 4. Train; then fold one temperature into the head so the student's confidence matches its dev labels or targets.
    trainer = distillation_trainer(options, args, model, tokenizer, train_dataset, new_parameters, dev_set)
    if resume_from:
        log(f"resuming from {resume_from}")
    advice = "free space there, or pass another --output_dir (or --save_strategy no)"
    with writing_to(options.output_dir, "checkpoints", advice):
        metrics = {"train": trainer.train(resume_from_checkpoint=resume_from).metrics}
    calibration, found = calibrate_on_holdout(
        trainer,
        holdout_dataset,
        holdout_targets,
        options.multi_label,
        options.calibrate,
        dev_set,
        dev_in_targets=bool(refinement_info.get("labeled_texts")),
    )
    metrics.update(found)
    if refinement is not None and "holdout" in metrics:  # refined targets: is the student past the raw teacher?
        teacher = teacher_classes(options.cache, manifest, holdout_rows)
        compare_with_the_teacher(metrics["holdout"], holdout_targets, teacher, trainer.state.global_step)

    # 5. Save a standard classifier plus what made it, atomically; then, if asked, its ONNX export.
    if trainer.is_world_process_zero():
        info = distill_info(
            options,
            manifest,
            args,
            refinement,
            refinement_info,
            sample_weights=trainer.sample_weights,
            new_parameters=new_parameters,
            calibration=calibration,
            max_length=max_length,
            truncated_texts=truncated_texts,
            metrics=metrics,
        )
        advice = "free space there, or pass another --output_dir; nothing half-written was left"
        with writing_to(options.output_dir, "the student", advice):
            save_student(trainer, options.output_dir, info, refinement)
        log(f"saved student to {options.output_dir}")
        if options.export:
            export_onnx(options.output_dir, table, holdout_rows, train_rows)
        print(options.output_dir)
    return options.output_dir


main = cli(
    StudentOptions,
    train,
    "Train a student classifier on soft targets from a teacher cache.",
    extra="training_args",
    extra_help="any transformers.TrainingArguments field, e.g. --learning_rate 5e-5 --num_train_epochs 3.",
)


if __name__ == "__main__":
    run_cli(main)
