"""The student's model card (`README.md` in its directory, the hub's format): written by stage 2, extended by stage 3.

The card is what people read first on the hub: a YAML header (library, pipeline tag, base model, labels as
tags) and a short text saying how the student was made, how well it agrees with its teacher, and how to load it.
"""

import json
import os
import re

from zsdistill.cache import atomic_file

CARD_FILE = "README.md"
INFO_FILE = (
    "distill_info.json"  # every setting and metric of the run; written last, so a student without it is not finished
)
EVALUATION_HEADING = "## Evaluation"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _card_data(info: dict):
    from huggingface_hub import ModelCardData

    base = info["student_base"]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification",
        # The hub links a base model by its id; a local directory has none to link.
        base_model=base if HUB_ID.match(base) and not os.path.exists(base) else None,
        tags=["zero-shot-distillation", "zsdistill", "multi-label" if info["multi_label"] else "single-label"],
    )


def adaptation_text(adapted: dict | None) -> str:
    """What the card says about adaptation rounds (train_student.py --adapt_rounds): none, made and kept, or made and
    left for the frozen space by the dev labels."""
    if not adapted:
        return ""
    rounds = adapted["rounds"]
    made = (
        f"{len(rounds)} adaptation round(s) of the embedding model (fine-tuned on "
        + ", ".join(str(r["texts_trained_on"]) for r in rounds)
        + " of refinement's surest texts, "
        + ", ".join("read from the cache" if r["cached"] else f"{r['seconds']:.0f} s" for r in rounds)
        + ")"
    )
    check = adapted.get("dev_check")
    if not check:
        return f"; in the space of {made}"
    nll = check["held_out_nll"]
    if not check["kept"]:
        return (
            f"; {made} left unused: the dev labels' held-out likelihood preferred the frozen space (-log p per dev "
            f"label {nll['frozen']:.3f} frozen, {nll['adapted']:.3f} adapted)"
        )
    return (
        f"; in the space of {made}, kept as the dev labels preferred it (-log p per dev label {nll['adapted']:.3f} "
        f"against the frozen space's {nll['frozen']:.3f})"
    )


def render(info: dict, evaluations: str = "") -> str:
    """The card's text for a student described by its distill_info.json."""
    summary = info["cache_summary"]
    named = lambda classes: ", ".join(f"`{summary['class_names'][k]}`" for k in classes)  # noqa: E731
    refinement = info.get("refinement") or {}
    holdout = info.get("metrics", {}).get("holdout", {})
    agreement = (
        f"{holdout['agreement']:.4f} on {holdout['examples']} held-out texts"
        if "agreement" in holdout
        else "not measured (no held-out rows)"
    )
    if "teacher_agreement" in holdout:
        agreement += f" (the raw teacher's: {holdout['teacher_agreement']:.4f}" + (
            "; **below it: the student learned less of its targets than the teacher knows; train it longer**)"
            if holdout.get("below_teacher")
            else ")"
        )
    labeled = refinement.get("labeled_texts")
    if refinement.get("method"):
        refined = (
            ("refinement of the teacher's targets" if labeled else "label-free refinement of the teacher's targets")
            + f" (`{refinement['method']}`, {refinement['rounds']} rounds; "
            f"the refined labels agree with the teacher's on {refinement['agreement_with_teacher']:.1%} of the texts"
            + (
                f"; centroids moved toward {labeled['examples']} labeled dev texts"
                + (
                    f" (each one refinement already placed right counting as {labeled['agreed_weight']:g} of a text)"
                    if labeled.get("agreed_weight", 1.0) != 1.0
                    else ""
                )
                + f", confidence fitted on their labels (cross-fitted), kappa {refinement['kappa']:.1f}"
                + (
                    f", class priors corrected by them (biases {', '.join(f'{b:+.2f}' for b in labeled['prior_bias'])})"
                    if labeled.get("prior_bias")
                    else ""
                )
                if labeled
                else f"; confidence fitted to the teacher's labels, kappa {refinement['kappa']:.1f}"
                if "rounds_kappa" in refinement
                else ""
            )
            + adaptation_text(refinement.get("adaptation"))
            + ("; embeddings centred on the corpus mean" if refinement.get("center") else "")
            + (
                "; refined again anchored to the texts the teacher is surest of for "
                f"{named(refinement['guarded_classes'])}, which the first refinement drifted from"
                if refinement.get("guarded_classes")
                else ""
            )
            + (
                f"; the targets gave {named(refinement['starved_classes'])} under a quarter of the texts the teacher "
                f"gives each, so each was made the most likely class of {refinement['starved_share']:.0%} of the "
                "teacher's count of texts, those nearest its centroid"
                if refinement.get("starved_classes") and refinement.get("starved_share")
                else f"; the targets give {named(refinement['starved_classes'])} under a quarter of the texts the "
                "teacher gives each, so the student rarely predicts them"
                if refinement.get("starved_classes")
                else ""
            )
            + (
                f"; no class's prior under the smaller of the teacher's and {refinement['prior_floor']:g} / K"
                if refinement.get("prior_floor")
                else ""
            )
            + (
                f"; then propagated over each text's {refinement['propagate_neighbours']} nearest texts (alpha "
                f"{refinement['propagate']:g}), as sure on average as before"
                if refinement.get("propagate")
                else ""
            )
            + ")"
        )
    else:
        refined = f"none ({refinement.get('reason', 'not recorded')})"
    balance = info.get("balance") or {}
    balanced = "none: every row once an epoch"
    if balance.get("applied"):
        power = balance.get("power", 1.0)
        balanced = (
            f"{balance['method']} ("
            + (
                "every class of the targets drawn equally often"
                if power == 1
                else f"class shares by class size to the power {1 - power:g}"
            )
            + ")"
        )
    head = info.get("head_learning_rate") or {}
    head_rate = (
        f"{head['factor']:g} x the learning rate for the new head ({', '.join(f'`{p}`' for p in head['parameters'])})"
        if head.get("parameters") and head.get("factor", 1) != 1
        else "the learning rate for every parameter"
    )
    classes = ", ".join(f"`{name}`" for name in summary["class_names"])
    lines = [
        "# A zero-shot classifier, distilled",
        "",
        f"A {'multi' if info['multi_label'] else 'single'}-label text classifier distilled with "
        f"zsdistill from the zero-shot teacher `{summary['teacher']}` "
        f"({summary['teacher_kind']}), without labeled data: the teacher scored {summary['num_examples']:,} unlabeled "
        f"texts "
        f"once, and this student learned its scores. It classifies a text in one forward pass.",
        "",
        "| | |",
        "| --- | --- |",
        f"| teacher | `{summary['teacher']}` |",
        f"| hypothesis template | `{summary['hypothesis_template']}` |",
        f"| classes | {classes} |",
        f"| unlabeled texts | {summary['num_examples']:,} |",
        f"| base model | `{info['student_base']}` |",
        f"| temperature | {info['temperature']} |",
        f"| labels | {'multi-label (sigmoid per class)' if info['multi_label'] else 'single-label (softmax)'} |",
        f"| target refinement | {refined} |",
        f"| balanced distillation | {balanced} |",
        f"| learning rates | {head_rate} |",
        f"| agreement with the targets | {agreement} |",
        f"| confidence | {calibration_text(info)} |",
        *([f"| dev set | {_dev(info['metrics']['dev'], info)} |"] if "dev" in info.get("metrics", {}) else []),
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classifier = pipeline("text-classification", model="<this model\'s directory or hub id>", top_k=None)',
        'classifier(["Your text here."])',
        "```",
        "",
        "`distill_info.json` beside this card records every setting and metric of the run.",
        "",
    ]
    lines += _serving_lines(info.get("export"))
    card = _card_data(info).to_yaml()
    return f"---\n{card}\n---\n\n" + "\n".join(lines) + (evaluations or "")


def same_count_per_class(per_class) -> int | None:
    """k where a dev set has k texts of every one of its more than two classes: such a set (drawn k a class) carries
    none of the classes' shares. None otherwise."""
    return int(min(per_class)) if len(per_class) > 2 and min(per_class) == max(per_class) else None


def calibration_text(info: dict) -> str:
    """How the student's confidence was calibrated, in words the stage 3 report repeats."""
    calibration = info.get("calibration") or {}
    fitted_on = calibration.get("fitted_on", "held-out targets" if calibration.get("applied") else None)
    if calibration.get("dev_in_targets") and fitted_on == "held-out targets":
        labeled = (info.get("refinement") or {}).get("labeled_texts") or {}
        # A dev set of k a class carries no class shares: a prior bias fitted on it leans toward equal shares, which
        # left a generic class holding 37% of the texts under-predicted and the confidence high (benchmarks/README.md).
        same_count = same_count_per_class(labeled.get("per_class") or []) if labeled.get("prior_bias") else None
        return (
            f"calibrated on {calibration['dev_examples']} dev labels through its targets (refinement's confidence "
            + ("and class priors " if labeled.get("prior_bias") else "")
            + "fitted on them, cross-fitted; the student fitted to its targets on held-out rows)"
            + (
                f"; the dev set has {same_count} of every class, so the class priors lean toward equal shares: "
                "where the classes are imbalanced the confidence may run high (a random sample of your texts "
                "carries their shares)"
                if same_count
                else ""
            )
        )
    if fitted_on == "dev labels":
        temperatures = "one temperature a class" if calibration.get("per_class") else "one temperature"
        return f"calibrated on {calibration['dev_examples']} dev labels ({temperatures} folded into the head)"
    if fitted_on:
        return (
            "calibrated label-free, to the student's targets on held-out rows (unverified where texts do not "
            "cluster by class)"
        )
    return "not calibrated"


def _dev(dev: dict, info: dict) -> str:
    first = ("subset accuracy", "subset_accuracy") if "subset_accuracy" in dev else ("accuracy", "accuracy")
    shaped = (info.get("calibration") or {}).get("dev_in_targets")
    interval = dev.get("interval_95")  # absent in cards of releases before it

    def spread(key: str) -> str:
        return f" (95% interval {interval[key][0]:.2f}-{interval[key][1]:.2f})" if interval else ""

    return (
        f"{dev['examples']} labeled texts: {first[0]} {dev[first[1]]:.4f}{spread(first[1])}, macro-F1 "
        f"{dev['macro_f1']:.4f}{spread('macro_f1')}, ECE {dev['ece']:.4f} ("
        + (
            "they also shaped the targets, so these are optimistic; not a test set)"
            if shaped
            else "a small set, not a test set)"
        )
    )


def _serving_lines(export: dict | None) -> list[str]:
    if not export:
        return []
    files = export["files"]
    rows = [
        f"| `{f['file']}` | {precision} | {f['size_mb']} MB | {f['agreement']:.4f} | "
        f"{f['max_probability_difference']:.4f} |"
        for precision, f in files.items()
    ]
    return [
        "## Serving with ONNX Runtime",
        "",
        f"Exported with onnxruntime {export['versions']['onnxruntime']} (opset {export['versions']['opset']}); "
        f"{export['quantization']}. Parity with the PyTorch student on {export['parity_texts']} "
        f"{export['parity_source']}:",
        "",
        "| file | precision | size | agreement | largest probability difference |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        *[f"**Warning**: {warning}." for warning in export.get("warnings", [])],
        "```python",
        "import onnxruntime, transformers",
        "",
        'tokenizer = transformers.AutoTokenizer.from_pretrained("<this model\'s directory>")',
        'session = onnxruntime.InferenceSession("<this model\'s directory>/onnx/model_quantized.onnx")',
        'logits = session.run(["logits"], dict(tokenizer(["Your text here."], padding=True, truncation=True, '
        'return_tensors="np")))[0]',
        "```",
        "",
        f"The logits are the PyTorch student's, calibration included: their {export['probabilities']} gives its "
        f"probabilities.",
        "",
    ]


def update(directory: str) -> None:
    """Render the card again from the directory's distill_info.json, keeping its evaluation section."""
    with open(os.path.join(directory, INFO_FILE)) as f:
        info = json.load(f)
    path, evaluations = os.path.join(directory, CARD_FILE), ""
    if os.path.exists(path):
        with open(path) as f:
            parts = f.read().split("\n" + EVALUATION_HEADING + "\n", 1)
        evaluations = "\n" + EVALUATION_HEADING + "\n" + parts[1] if len(parts) == 2 else ""
    with atomic_file(path) as f:
        f.write(render(info, evaluations))


def write(directory: str, info: dict) -> None:
    with atomic_file(os.path.join(directory, CARD_FILE)) as f:
        f.write(render(info))


def add_evaluation(
    directory: str, test_set: str, metrics: dict, multi_label: bool, refined_teacher: dict | None, teacher: dict | None
) -> bool:
    """Add (or replace) the card's evaluation section with one test set's results. Touches nothing else in the
    directory. Returns False when there is no card to extend or the directory is not writable."""
    path = os.path.join(directory, CARD_FILE)
    if not os.path.exists(path) or not os.access(directory, os.W_OK) or not os.access(path, os.W_OK):
        return False
    with open(path) as f:
        text = f.read()
    keys = (
        [("subset accuracy", "subset_accuracy"), ("micro-F1", "micro_f1")]
        if multi_label
        else [("accuracy", "accuracy")]
    )
    keys += [("macro-F1", "macro_f1"), ("ECE (15 bins)", "ece")]
    columns = (
        [("student", metrics)]
        + ([("zero-shot teacher", teacher)] if teacher else [])
        + ([("refined teacher", refined_teacher)] if refined_teacher else [])
    )
    section = [
        EVALUATION_HEADING,
        "",
        f"On the labeled test set `{test_set}` (measured by zsdistill's evaluate.py):",
        "",
        "| metric | " + " | ".join(name for name, _ in columns) + " |",
        "| --- " * (len(columns) + 1) + "|",
    ]

    def cell(m: dict, key: str) -> str:  # with its 95% bootstrap interval where the report has one
        interval = m.get("interval_95", {}).get(key)
        return f"{m[key]:.4f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else "")

    for title, key in keys:
        section.append(f"| {title} | " + " | ".join(cell(m, key) for _, m in columns) + " |")
    resamples = next((m["interval_95"]["resamples"] for _, m in columns if "interval_95" in m), None)
    if resamples:
        section += ["", f"In brackets: 95% intervals over {resamples:,} bootstrap resamples of the test texts."]
    before = text.split("\n" + EVALUATION_HEADING + "\n")[0].rstrip("\n")
    with atomic_file(path) as f:
        f.write(before + "\n\n" + "\n".join(section) + "\n")
    return True
