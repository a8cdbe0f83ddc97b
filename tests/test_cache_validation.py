"""Caches are untrusted input: a crafted or damaged manifest is refused by all three stages with one line and exit 2."""

import json
import os
import shutil
import sys

import pytest
from conftest import CLASS_NAMES, CORPUS, make_student_base, run_main

import teacher_infer
import train_student
from zsdistill import cache
from zsdistill.errors import UserError


@pytest.fixture(scope="module")
def made(teachers, tmp_path_factory):
    """A real cache (stage 1), its command's arguments, a labeled test file and a student trained on it."""
    root = tmp_path_factory.mktemp("validation")
    data = root / "texts.txt"
    data.write_text("\n".join(CORPUS) + "\n")
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASS_NAMES) + "\n")
    test = root / "test.jsonl"
    test.write_text(
        "".join(
            json.dumps({"text": t, "label": CLASS_NAMES[i % len(CLASS_NAMES)]}) + "\n" for i, t in enumerate(CORPUS)
        )
    )
    args = [
        "--data_file",
        str(data),
        "--class_names_file",
        str(classes),
        "--teacher_name_or_path",
        teachers["upper"],
        "--cache_dir",
        str(root / "cache"),
    ]
    path = teacher_infer.main(
        data_file=str(data),
        class_names_file=str(classes),
        teacher_name_or_path=teachers["upper"],
        cache_dir=str(root / "cache"),
        shard_size=4,
    )
    student = train_student.main(
        cache=path,
        output_dir=str(root / "student"),
        student_name_or_path=make_student_base(str(root / "base")),
        max_steps=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return {"root": root, "cache": path, "args": args, "test": str(test), "student": student}


def craft(made, tmp_path, change) -> str:
    """A copy of the good cache whose manifest `change` edits; the original stays intact for the next test."""
    manifest = json.load(open(os.path.join(made["cache"], cache.MANIFEST)))
    backup = tmp_path / "manifest.json"
    shutil.copy(os.path.join(made["cache"], cache.MANIFEST), backup)
    change(manifest)
    cache.write_json_atomic(os.path.join(made["cache"], cache.MANIFEST), manifest)
    return str(backup)


def outside_shard(manifest, made):
    """Point shard 0 at a file outside the cache that is a byte-for-byte copy of it: only the name gives it away."""
    outside = made["root"] / "outside.arrow"
    shutil.copy(os.path.join(made["cache"], manifest["shards"][0]["file"]), outside)
    manifest["shards"][0]["file"] = os.path.relpath(outside, made["cache"])


def wrong_widths(manifest, made):
    manifest["class_names"] = manifest["class_names"] + ["extra"]
    manifest["hypotheses"] = manifest["hypotheses"] + ["This example is extra."]


CRAFTED = {
    "path escape": (outside_shard, "does not name its file shard-00000.arrow inside the cache directory"),
    "absolute path": (
        lambda m, made: m["shards"][1].update(file="/etc/passwd"),
        "does not name its file shard-00001.arrow",
    ),
    # Stage 1 knows the classes it asked for: the manifest disagrees with its key. Stages 2 and 3 read the shards.
    "wrong widths": (wrong_widths, ("values per row, expected 7 (one per class)", "does not match the cache's key")),
    "negative count": (lambda m, made: m.update(num_examples=-5), "num_examples is negative"),
    "shard rows off": (lambda m, made: m["shards"][0].update(rows=99), "do not follow the previous shard"),
    "missing field": (lambda m, made: m.pop("class_names"), "no field 'class_names'"),
    "wrong type": (lambda m, made: m.update(score_columns="entailment"), "field 'score_columns' is not a list"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_manifest_is_refused_by_every_stage(made, tmp_path, case):
    change, words = CRAFTED[case]
    backup = craft(made, tmp_path, lambda m: change(m, made))
    try:
        runs = {
            "stage 1": run_main("teacher_infer.py", *made["args"], "--shard_size", "4"),
            "stage 2": run_main(
                "train_student.py",
                "--cache",
                made["cache"],
                "--output_dir",
                tmp_path / "student",
                "--max_steps",
                "1",
                "--use_cpu",
            ),
            "stage 3": run_main(
                "evaluate.py",
                "--model",
                made["student"],
                "--test_file",
                made["test"],
                "--teacher_cache",
                made["cache"],
                "--output_dir",
                tmp_path / "report",
            ),
        }
    finally:
        shutil.copy(backup, os.path.join(made["cache"], cache.MANIFEST))
    for stage, result in runs.items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (stage, result.stderr[-2000:])
        alternatives = words if isinstance(words, tuple) else (words,)
        assert (
            lines[-1].startswith("error: ")
            and any(w in lines[-1] for w in alternatives)
            and "Traceback" not in result.stderr
        ), (stage, lines[-1])
        assert "passwd" not in lines[-1] and "outside" not in lines[-1]  # only paths inside the cache are named
    assert not os.path.exists(tmp_path / "student") and not os.path.exists(tmp_path / "report")


def test_no_file_outside_the_cache_is_read_as_a_shard(made, tmp_path):
    backup = craft(made, tmp_path, lambda m: outside_shard(m, made))
    opened, recording = [], [True]
    sys.addaudithook(
        lambda event, args: opened.append(str(args[0])) if recording[0] and event == "open" and args else None
    )
    try:
        with pytest.raises(UserError):
            cache.load_cache(made["cache"])
        with pytest.raises(UserError):
            cache.is_complete(made["cache"])
    finally:
        recording[0] = False
        shutil.copy(backup, os.path.join(made["cache"], cache.MANIFEST))
    assert not [p for p in opened if "outside" in p], opened


def test_a_completion_record_naming_another_file_does_not_count(made):
    manifest = json.load(open(os.path.join(made["cache"], cache.MANIFEST)))
    shard = manifest["shards"][0]
    record_path = os.path.join(made["cache"], cache.done_file(0))
    good = open(record_path).read()
    assert cache.read_done_record(made["cache"], 0, shard["start"], shard["stop"]) is not None
    try:
        cache.write_json_atomic(record_path, {**json.loads(good), "file": "../outside.arrow"})
        assert cache.read_done_record(made["cache"], 0, shard["start"], shard["stop"]) is None
    finally:
        with open(record_path, "w") as f:
            f.write(good)


def test_a_crafted_donor_is_skipped_with_a_note(made, teachers, tmp_path):
    """Incremental classes reuse scores from other caches: an invalid one is not used, and the log says so."""
    donor = os.path.join(str(made["root"] / "cache"), "crafted-donor")
    shutil.copytree(made["cache"], donor)
    manifest = json.load(open(os.path.join(donor, cache.MANIFEST)))
    manifest["shards"][0]["file"] = "../../outside.arrow"
    cache.write_json_atomic(os.path.join(donor, cache.MANIFEST), manifest)
    classes = tmp_path / "more.txt"
    classes.write_text("\n".join(CLASS_NAMES + ["travel"]) + "\n")
    args = list(made["args"])
    args[args.index("--class_names_file") + 1] = str(classes)
    try:
        result = run_main("teacher_infer.py", *args, "--shard_size", "4")
    finally:
        shutil.rmtree(donor)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not reusing scores from" in result.stderr and "crafted-donor" in result.stderr
    assert "reusing 6 of 7 hypotheses" in result.stderr  # from the good cache
