"""Stage 1: cache schema, row order, pipeline equivalence, cache hits, truncation, input formats."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from conftest import CLASS_NAMES, CORPUS, count_forward_passes, run_script

import teacher_infer
from zsdistill import cache, targets
from zsdistill import inference
from zsdistill import teacher as zs_teacher
from zsdistill.errors import UserError

LONG_TEXT = "an extremely long line about sports and finance " * 400  # far beyond the 64-token max length


def read_via_manifest(cache_path: str) -> pa.Table:
    """Rebuild the table from manifest.json alone, as any Arrow reader would."""
    with open(os.path.join(cache_path, "manifest.json")) as f:
        manifest = json.load(f)
    return pa.concat_tables(ipc.open_stream(os.path.join(cache_path, s["file"])).read_all() for s in manifest["shards"])


def test_schema_and_row_order_across_shards(teachers, tmp_path):
    texts = [f"example number {i} about {CLASS_NAMES[i % 6]}" for i in range(23)]
    (tmp_path / "texts.txt").write_text("\n\n".join(texts) + "\n\n")  # blank lines are skipped
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    path = teacher_infer.main(
        data_file=str(tmp_path / "texts.txt"),
        class_names_file=str(tmp_path / "classes.txt"),
        teacher_name_or_path=teachers["upper"],
        cache_dir=str(tmp_path / "cache"),
        shard_size=5,
    )
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["complete"] and manifest["format_version"] == cache.FORMAT_VERSION
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.arrow" for i in range(5)]
    assert manifest["class_names"] == CLASS_NAMES
    assert manifest["hypotheses"] == [f"This example is {c}." for c in CLASS_NAMES]
    assert manifest["teacher"]["entailment_index"] == 2 and manifest["teacher"]["contradiction_index"] == 0
    assert manifest["score_columns"] == ["entailment", "contradiction", "neutral"]
    assert manifest["num_examples"] == 23 and manifest["forward_passes"]["computed"] == 23 * 6
    for shard in manifest["shards"]:
        shard_table = ipc.open_stream(os.path.join(path, shard["file"])).read_all()
        assert shard_table.column_names == ["index", "text", "entailment", "contradiction", "neutral"]
        assert shard_table.num_rows == shard["rows"] == shard["stop"] - shard["start"]
    table = read_via_manifest(path)
    assert table.column("text").to_pylist() == texts
    assert table.column("index").to_pylist() == list(range(23))
    assert table.schema.field("entailment").type == pa.list_(pa.float32())
    assert all(len(v) == 6 for v in table.column("neutral").to_pylist())
    # datasets reads each shard too.
    from datasets import Dataset

    first = Dataset.from_file(os.path.join(path, "shard-00000.arrow"))
    assert first["text"] == texts[:5]


@pytest.mark.parametrize("style", ["upper", "lower", "two"])
def test_cached_logits_reproduce_zero_shot_pipeline(teachers, tmp_path, style):
    from transformers import pipeline

    texts = CORPUS + [LONG_TEXT]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES))
    template = "The topic is {}."
    path = teacher_infer.main(
        data_file=str(tmp_path / "texts.jsonl"),
        class_names_file=str(tmp_path / "classes.txt"),
        teacher_name_or_path=teachers[style],
        hypothesis_template=template,
        cache_dir=str(tmp_path / "cache"),
        shard_size=4,
        teacher_batch_size=7,
    )
    manifest, table = cache.load_cache(path)
    columns = cache.score_arrays(manifest, table)
    classifier = pipeline("zero-shot-classification", model=teachers[style], device="cpu")
    for multi_label in (False, True):
        ours = targets.teacher_probabilities(columns, multi_label=multi_label)
        results = classifier(
            texts, candidate_labels=CLASS_NAMES, hypothesis_template=template, multi_label=multi_label, batch_size=5
        )
        theirs = np.array([[dict(zip(r["labels"], r["scores"]))[c] for c in CLASS_NAMES] for r in results])
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # The long text was truncated (to the teacher's 64 tokens), not crashed: its scores equal the pipeline's above.
    assert manifest["max_length"] == 64


def test_rerun_is_a_cache_hit_without_loading_the_model(teachers, corpus_files, tmp_path, monkeypatch, capsys):
    data_file, classes_file = corpus_files
    kwargs = dict(teacher_name_or_path=teachers["upper"], cache_dir=str(tmp_path / "cache"), shard_size=3)
    calls = count_forward_passes(monkeypatch)
    first = teacher_infer.main(data_file=data_file, class_names_file=classes_file, **kwargs)
    assert calls["loads"] == 1 and calls["pairs"] == len(CORPUS) * len(CLASS_NAMES)
    shard_state = {f: os.stat(os.path.join(first, f)).st_mtime_ns for f in os.listdir(first)}
    calls.update(loads=0, pairs=0)
    capsys.readouterr()
    second = teacher_infer.main(data_file=data_file, class_names_file=classes_file, **kwargs)
    assert second == first
    assert calls == {"loads": 0, "pairs": 0}
    assert {f: os.stat(os.path.join(first, f)).st_mtime_ns for f in os.listdir(first)} == shard_state
    assert capsys.readouterr().out.strip().splitlines()[-1] == first


def test_key_changes_with_classes_and_template(teachers, corpus_files, tmp_path):
    data_file, classes_file = corpus_files
    kwargs = dict(teacher_name_or_path=teachers["upper"], cache_dir=str(tmp_path / "cache"))
    base = teacher_infer.main(data_file=data_file, class_names_file=classes_file, **kwargs)
    more = tmp_path / "more.txt"
    more.write_text("\n".join(CLASS_NAMES + ["politics"]))
    with_more = teacher_infer.main(data_file=data_file, class_names_file=str(more), **kwargs)
    other_template = teacher_infer.main(
        data_file=data_file, class_names_file=classes_file, hypothesis_template="It is about {}.", **kwargs
    )
    assert len({base, with_more, other_template}) == 3


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_input_formats_give_the_same_cache(teachers, tmp_path, fmt):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    texts = CORPUS[:5] + ['a text with "quotes", commas, and\ttabs']
    data_file = tmp_path / f"data.{fmt}"
    table = pa.table({"id": list(range(len(texts))), "body": texts})
    if fmt == "txt":
        data_file.write_text("\n".join(texts) + "\n")
    elif fmt == "csv":
        pacsv.write_csv(table, str(data_file))
    elif fmt == "jsonl":
        data_file.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    else:
        pq.write_table(table, str(data_file))
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES))
    path = teacher_infer.main(
        data_file=str(data_file),
        class_names_file=str(tmp_path / "classes.txt"),
        teacher_name_or_path=teachers["two"],
        text_column="body",
        cache_dir=str(tmp_path / "cache"),
    )
    manifest, table = cache.load_cache(path)
    assert table.column("text").to_pylist() == texts
    assert manifest["score_columns"] == ["entailment", "contradiction"]  # not_entailment stored as contradiction
    # The data fingerprint hashes the texts, not the file: every format lands on the same key.
    (tmp_path / "ref.txt").write_text("\n".join(texts))
    reference = teacher_infer.main(
        data_file=str(tmp_path / "ref.txt"),
        class_names_file=str(tmp_path / "classes.txt"),
        teacher_name_or_path=teachers["two"],
        cache_dir=str(tmp_path / "cache"),
    )
    assert reference == path


def test_cli_help_and_last_stdout_line(teachers, corpus_files, tmp_path):
    help_text = run_script("teacher_infer.py", "--help")
    for flag in (
        "--data_file",
        "--class_names_file",
        "--teacher_name_or_path",
        "--hypothesis_template",
        "--teacher_batch_size",
        "--cache_dir",
        "--max_length",
        "--text_column",
        "--shard_size",
        "--fp16",
        "--bf16",
        "--no_cuda",
    ):
        assert flag in help_text.stdout + help_text.stderr, flag
    data_file, classes_file = corpus_files
    result = run_script(
        "teacher_infer.py",
        "--data_file",
        data_file,
        "--class_names_file",
        classes_file,
        "--teacher_name_or_path",
        teachers["lower"],
        "--cache_dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(last, "manifest.json"))
    assert "pairs/s" in result.stderr  # the progress bar reports throughput


def test_pair_encoder_matches_tokenizer_pairs(teachers):
    from transformers import AutoTokenizer

    for style in ("upper", "lower"):
        tokenizer = AutoTokenizer.from_pretrained(teachers[style])
        encoder = inference.PairEncoder(tokenizer, 24)
        premises = CORPUS[:3] + [LONG_TEXT]
        hypotheses = ["This example is sports.", "finance"]
        premise_ids, hypothesis_ids = encoder.tokenize(premises), encoder.tokenize(hypotheses)
        for p, p_ids in zip(premises, premise_ids):
            for h, h_ids in zip(hypotheses, hypothesis_ids):
                expected = tokenizer(p, h, truncation="only_first", max_length=24, return_token_type_ids=True)
                ids, types = encoder.encode(p_ids, h_ids)
                assert ids == expected["input_ids"]
                assert types == expected["token_type_ids"]


def test_length_sorted_batches_respect_budgets():
    lengths = np.array([5, 50, 7, 30, 30, 6, 100, 8])
    batches = inference.length_sorted_batches(lengths, max_pairs=3, max_tokens=100)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    for batch in batches:
        assert len(batch) <= 3 and (len(batch) == 1 or len(batch) * lengths[batch].max() <= 100)


def test_batch_defaults_follow_the_device_and_flags_override_them(teachers, corpus_files, tmp_path, monkeypatch):
    data_file, classes_file = corpus_files
    seen = []
    real = inference.nli_logits

    def spy(model, encoder, premises, hypotheses, max_pairs, max_tokens, *args, **kwargs):
        seen.append((max_pairs, max_tokens))
        return real(model, encoder, premises, hypotheses, max_pairs, max_tokens, *args, **kwargs)

    monkeypatch.setattr(inference, "nli_logits", spy)
    common = dict(data_file=data_file, class_names_file=classes_file, teacher_name_or_path=teachers["upper"])
    default_path = teacher_infer.main(**common, cache_dir=str(tmp_path / "a"))
    assert set(seen) == {inference.BATCH_DEFAULTS["cpu"]}
    seen.clear()
    explicit_path = teacher_infer.main(
        **common, cache_dir=str(tmp_path / "b"), teacher_batch_size=3, max_batch_tokens=64
    )
    assert set(seen) == {(3, 64)}
    # Batch shape is not part of the key: both runs made the same cache, with the same scores.
    assert os.path.basename(default_path) == os.path.basename(explicit_path)
    np.testing.assert_allclose(
        np.array(read_via_manifest(default_path)["entailment"].to_pylist()),
        np.array(read_via_manifest(explicit_path)["entailment"].to_pylist()),
        atol=1e-5,
    )
    assert "--teacher_batch_size" not in cache.read_manifest(default_path)["command"]


def test_gpu_out_of_memory_names_the_flag_to_lower(teachers, corpus_files, tmp_path, monkeypatch):
    data_file, classes_file = corpus_files

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(inference, "nli_logits", out_of_memory)
    with pytest.raises(UserError, match=r"out of GPU memory .* lower --max_batch_tokens \(e\.g\. to 2048\)"):
        teacher_infer.main(
            data_file=data_file,
            class_names_file=classes_file,
            teacher_name_or_path=teachers["upper"],
            cache_dir=str(tmp_path / "c"),
        )
    (cache_path,) = [os.path.join(tmp_path / "c", d) for d in os.listdir(tmp_path / "c")]
    assert not cache.is_complete(cache_path)
    assert not [f for f in os.listdir(cache_path) if f.endswith(".arrow")]


def test_bf16_autocast_path_stays_close_to_fp32(teachers):
    # This CPU lacks bf16 units (teacher_infer.py refuses --bf16 here), but autocast still runs, slowly, which a
    # tiny model does not mind: this checks the numbers of the --bf16 path, not its speed (benchmarks/ does that).
    teacher = zs_teacher.resolve_teacher(teachers["upper"])
    model, tokenizer = zs_teacher.load_model(teacher, torch.device("cpu"))
    encoder = inference.PairEncoder(tokenizer, 64)
    premises, hypotheses = (
        encoder.tokenize(CORPUS + [LONG_TEXT]),
        encoder.tokenize([f"This example is {c}." for c in CLASS_NAMES]),
    )
    logits = {p: inference.nli_logits(model, encoder, premises, hypotheses, 8, 512, p) for p in ("fp32", "bf16")}
    assert logits["bf16"].dtype == np.float32
    assert 0 < np.abs(logits["bf16"] - logits["fp32"]).max()  # it did run in lower precision
    for multi_label in (False, True):
        probabilities = {
            p: targets.teacher_probabilities(
                {name: logits[p][:, :, i] for name, i in teacher.label_columns.items()}, multi_label
            )
            for p in logits
        }
        np.testing.assert_allclose(probabilities["bf16"], probabilities["fp32"], atol=0.02, rtol=0)


def test_cache_files_get_the_umask_permissions(teachers, corpus_files, tmp_path):
    # Atomic writes go through mkstemp (owner-only 0600); a cache shared across users and nodes must stay readable.
    data_file, classes_file = corpus_files
    old_umask = os.umask(0o022)
    try:
        path = teacher_infer.main(
            data_file=data_file,
            class_names_file=classes_file,
            teacher_name_or_path=teachers["upper"],
            cache_dir=str(tmp_path / "c"),
        )
    finally:
        os.umask(old_umask)
    for name in (cache.MANIFEST, cache.shard_file(0), cache.done_file(0)):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o644, name


def test_truncated_texts_are_counted_for_both_teacher_kinds(teachers, embedding_teacher, tmp_path, capsys):
    # One WordPiece token per "cat"; both tiny teachers cut at 64 tokens. NLI: the premise's budget is 64 minus the
    # hypothesis and 3 special tokens, so the longer hypothesis (7 tokens) leaves 54. Embedding: 64 minus [CLS], [SEP].
    tokenizer = zs_teacher.load_tokenizer(zs_teacher.resolve_teacher(teachers["upper"]))[0]
    assert tokenizer("cat", add_special_tokens=False)["input_ids"].__len__() == 1
    (tmp_path / "classes.txt").write_text("sports\nfinance stock market\n")
    assert [
        len(tokenizer(f"This example is {c}.", add_special_tokens=False)["input_ids"])
        for c in ("sports", "finance stock market")
    ] == [5, 7]
    for kind, teacher, fits, cut in (("nli", teachers["upper"], 54, 55), ("embedding", embedding_teacher, 62, 63)):
        lengths = [3, fits, cut, 400, fits, 10, cut + 1]
        (tmp_path / f"{kind}.txt").write_text("".join(" ".join(["cat"] * n) + "\n" for n in lengths))
        capsys.readouterr()
        path = teacher_infer.main(
            data_file=str(tmp_path / f"{kind}.txt"),
            class_names_file=str(tmp_path / "classes.txt"),
            teacher_name_or_path=teacher,
            cache_dir=str(tmp_path / "cache"),
            shard_size=3,
        )
        manifest = cache.load_cache(path)[0]
        assert manifest["truncated_texts"] == 3, kind
        assert [s["truncated_texts"] for s in manifest["shards"]] == [1, 1, 1], kind
        assert manifest["max_length"] == 64
        assert (
            "long texts: 3 of 7 (42.9%) are longer than the teacher's 64 tokens and were cut" in capsys.readouterr().err
        )


def test_directory_glob_and_saved_dataset_give_the_one_file_cache(teachers, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    texts = [f"{CORPUS[i % len(CORPUS)]} (copy {i})" for i in range(22)]
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES))
    (tmp_path / "one.txt").write_text("\n".join(texts) + "\n")
    parts = [texts[0:6], texts[6:11], texts[11:19], texts[19:]]
    (tmp_path / "parquet" / "year=2026").mkdir(parents=True)
    for i, part in enumerate(parts):  # read in sorted path order: year=2026/ comes after part-0..2
        where = tmp_path / "parquet" / ("year=2026" if i == 3 else "") / f"part-{i}.parquet"
        pq.write_table(pa.table({"text": part, "id": list(range(len(part)))}), where)
    (tmp_path / "parquet" / "_SUCCESS").write_text("")  # what Spark leaves: skipped
    (tmp_path / "jsonl").mkdir()
    for i, part in enumerate(parts):
        (tmp_path / "jsonl" / f"shard-{i:02d}.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in part))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))

    def scores(data_file, **kwargs):
        path = teacher_infer.main(
            data_file=data_file,
            class_names_file=str(tmp_path / "classes.txt"),
            teacher_name_or_path=teachers["upper"],
            cache_dir=str(tmp_path / "cache"),
            shard_size=5,
            **kwargs,
        )
        manifest, table = cache.load_cache(path)
        return path, manifest, {n: table.column(n).to_pylist() for n in ["text", *manifest["score_columns"]]}

    reference_path, _, reference = scores(str(tmp_path / "one.txt"))
    for data_file, kwargs in (
        (str(tmp_path / "parquet"), {}),
        (str(tmp_path / "jsonl" / "shard-*.jsonl"), {"text_column": "body"}),
        (str(tmp_path / "saved"), {}),
    ):
        shutil.rmtree(
            tmp_path / "cache"
        )  # each input computes its own cache (the key is content-based: it would be a hit)
        path, manifest, got = scores(data_file, **kwargs)
        assert os.path.basename(path) == os.path.basename(reference_path) and got == reference, data_file
        assert manifest["data"]["path"] == os.path.abspath(data_file)
    shutil.rmtree(tmp_path / "cache")
    path, manifest, got = scores(None, dataset=str(tmp_path / "parquet" / "year=2026"), dataset_split="train")
    assert (
        got["text"] == parts[3]
        and manifest["data"]["dataset"].endswith("year=2026")
        and manifest["data"]["split"] == "train"
    )


def test_reading_some_rows_skips_files_and_row_groups_it_does_not_need(tmp_path, monkeypatch):
    import datasets
    import pyarrow.parquet as pq

    from zsdistill import data

    texts = [f"text number {i}" for i in range(40)]
    (tmp_path / "mixed").mkdir()
    pq.write_table(
        pa.table({"text": texts[:12]}), tmp_path / "mixed" / "a.parquet", row_group_size=4
    )  # row groups 0-3, 4-7, 8-11
    (tmp_path / "mixed" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[12:25]))
    (tmp_path / "mixed" / "c.txt").write_text("\n".join(texts[25:]) + "\n")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"), max_shard_size="1KB")
    file_rows = []
    assert data.scan_texts(str(tmp_path / "mixed"), file_rows=file_rows)[0] == 40 and file_rows == [12, 13, 15]
    groups_read = []
    real_iter_batches = pq.ParquetFile.iter_batches
    monkeypatch.setattr(
        pq.ParquetFile,
        "iter_batches",
        lambda self, **kw: groups_read.extend(kw["row_groups"]) or real_iter_batches(self, **kw),
    )
    for rows in ([(0, 40)], [(4, 8)], [(5, 6), (10, 14), (30, 35)], [(26, 40)], [(8, 12), (12, 13)], []):
        want = [t for i, t in enumerate(texts) if any(a <= i < b for a, b in rows)]
        groups_read.clear()
        assert list(data.iter_texts(str(tmp_path / "mixed"), rows=rows, file_rows=file_rows)) == want, rows
        assert groups_read == sorted({i // 4 for a, b in rows for i in range(a, min(b, 12))}), (
            rows
        )  # only row groups with wanted rows
        assert list(data.iter_texts(str(tmp_path / "saved"), rows=rows)) == want, rows
    # Files holding no wanted row are not opened: a damaged one is not even noticed.
    (tmp_path / "mixed" / "b.jsonl").write_text("not json\n")
    assert (
        list(data.iter_texts(str(tmp_path / "mixed"), rows=[(0, 3), (30, 32)], file_rows=file_rows))
        == texts[0:3] + texts[30:32]
    )
    with pytest.raises(UserError, match="b.jsonl, line 1: not valid JSON"):
        list(
            data.iter_texts(str(tmp_path / "mixed"), rows=[(0, 3), (30, 32)])
        )  # without file_rows it must read through b


@pytest.mark.parametrize(
    "args, words",
    [
        ((), ["give the texts with --data_file", "or with --dataset"]),
        (("--data_file", "{tmp}/none-*.jsonl"), ["matches no file", "quote it"]),
        (("--data_file", "{tmp}/empty"), ["holds no .txt/.csv/.jsonl/.json/.parquet file"]),
        (("--dataset", "{tmp}/ds"), ["has splits 'train'", "--dataset_split"]),
    ],
)
def test_bad_input_forms_are_one_line_errors(teachers, tmp_path, args, words):
    from conftest import run_main

    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a corpus")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    result = run_main(
        "teacher_infer.py",
        *[a.format(tmp=tmp_path) for a in args],
        "--class_names_file",
        tmp_path / "classes.txt",
        "--teacher_name_or_path",
        teachers["upper"],
        "--cache_dir",
        tmp_path / "cache",
    )
    assert result.returncode == 2, result.stderr[-1500:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and all(w in error[0] for w in words), result.stderr[-1500:]


@pytest.mark.parametrize("kind", ["nli", "embedding"])
def test_duplicates_are_scored_once_and_every_copy_gets_the_same_scores(
    teachers, embedding_teacher, tmp_path, monkeypatch, kind
):
    # 30 distinct texts; 13 rows repeat one (30% of 43), inside a shard and across shards.
    distinct = [f"{CORPUS[i % len(CORPUS)]} number {i}" for i in range(30)]
    rng = np.random.default_rng(0)
    texts = distinct + [distinct[i] for i in rng.integers(30, size=13)]
    texts = [texts[i] for i in rng.permutation(len(texts))]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES))
    teacher = teachers["upper"] if kind == "nli" else embedding_teacher
    calls = count_forward_passes(monkeypatch) if kind == "nli" else None

    def run(cache_dir, **kwargs):
        path = teacher_infer.main(
            data_file=str(tmp_path / "texts.txt"),
            class_names_file=str(tmp_path / "classes.txt"),
            teacher_name_or_path=teacher,
            cache_dir=str(tmp_path / cache_dir),
            shard_size=8,
            teacher_batch_size=5,
            **kwargs,
        )
        manifest, table = cache.load_cache(path)
        return manifest, {
            name: np.array(table.column(name).to_pylist())
            for name in [
                *manifest["score_columns"],
                *([manifest["text_embedding_column"]] if manifest["text_embedding_column"] else []),
            ]
        }

    manifest, deduplicated = run("dedup")
    if calls is not None:
        assert calls["pairs"] == 30 * len(CLASS_NAMES)  # 13 x 6 passes saved
        calls.update(pairs=0)
    per_text = len(CLASS_NAMES) if kind == "nli" else 1
    assert manifest["duplicate_rows"] == 13 and manifest["forward_passes"]["saved_by_deduplication"] == 13 * per_text
    assert manifest["forward_passes"]["computed"] == 30 * per_text + (
        len(CLASS_NAMES) if kind == "embedding" else 0
    )  # + the hypotheses
    plain_manifest, plain = run("plain", deduplicate=False)
    if calls is not None:
        assert calls["pairs"] == 43 * len(CLASS_NAMES)
    assert plain_manifest["duplicate_rows"] == 0 and plain_manifest["key"] == manifest["key"]
    for name, values in deduplicated.items():
        for text in set(texts):  # every copy of a text: exactly the same values
            rows = [i for i, t in enumerate(texts) if t == text]
            assert (values[rows] == values[rows[0]]).all(), (name, text)
        # ... and the same as scoring every row, within batching's floating-point noise.
        print(f"largest difference from scoring every row ({kind}, {name}): {np.abs(values - plain[name]).max():.2e}")
        assert np.abs(values - plain[name]).max() < 1e-5, (name, np.abs(values - plain[name]).max())


@pytest.mark.parametrize("kind", ["nli", "embedding"])
def test_chunked_long_texts_aggregate_their_windows_by_the_documented_rule(teachers, embedding_teacher, tmp_path, kind):
    words = "cat dog house tree river music bread money phone rain doctor game".split()  # one WordPiece token each
    rng = np.random.default_rng(0)
    long_text = " ".join(rng.choice(words, size=150))
    short = CORPUS[:3]
    (tmp_path / "classes.txt").write_text("sports\nfinance stock market\nfood\n")
    (tmp_path / "texts.txt").write_text("\n".join(short + [long_text]) + "\n")
    teacher = teachers["upper"] if kind == "nli" else embedding_teacher
    tokenizer = zs_teacher.load_tokenizer(zs_teacher.resolve_teacher(teacher))[0]
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    size = 64 - 3 - 7 if kind == "nli" else 64 - 2  # beside the longest hypothesis (7 tokens) / with [CLS] and [SEP]
    parts = inference.windows(ids, size)
    assert len(parts) == (4 if kind == "nli" else 3) and parts[-1][-1] == ids[-1] and all(len(p) == size for p in parts)
    window_texts = [tokenizer.decode(p) for p in parts]
    assert [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in window_texts
    ] == parts  # each window re-reads as itself
    (tmp_path / "windows.txt").write_text("\n".join(short + window_texts) + "\n")

    def run(data, **kwargs):
        path = teacher_infer.main(
            data_file=str(tmp_path / data),
            class_names_file=str(tmp_path / "classes.txt"),
            teacher_name_or_path=teacher,
            cache_dir=str(tmp_path / "cache"),
            **kwargs,
        )
        manifest, table = cache.load_cache(path)
        names = [
            *manifest["score_columns"],
            *([manifest["text_embedding_column"]] if manifest["text_embedding_column"] else []),
        ]
        return path, manifest, {name: np.array(table.column(name).to_pylist()) for name in names}

    chunked_path, manifest, chunked = run("texts.txt", chunk_long_texts=True)
    plain_path, plain_manifest, _ = run("texts.txt")
    _, _, windowed = run("windows.txt")
    assert os.path.basename(chunked_path) != os.path.basename(plain_path)  # a cache of its own
    assert (manifest["chunked_texts"], manifest["truncated_texts"]) == (1, 0) and plain_manifest["truncated_texts"] == 1
    for name, values in chunked.items():
        np.testing.assert_allclose(values[:3], windowed[name][:3], atol=1e-5)  # short texts: as without chunking
    if kind == "nli":
        margin = windowed["entailment"][3:] - windowed["contradiction"][3:]
        best = margin.argmax(0)  # per class, the window that entails it most
        for name in ("entailment", "contradiction", "neutral"):
            np.testing.assert_allclose(chunked[name][3], windowed[name][3:][best, np.arange(3)], atol=1e-5)
    else:
        total = windowed["text_embedding"][3:].sum(0)
        np.testing.assert_allclose(chunked["text_embedding"][3], total / np.linalg.norm(total), atol=1e-5)
        np.testing.assert_allclose(
            chunked["similarity"][3], windowed["similarity"][3:].sum(0) / np.linalg.norm(total), atol=1e-5
        )
