"""Every user mistake gets one clear line, a non-zero exit, no traceback, and nothing valid-looking left behind.

Most cases run the stage's CLI in this process (conftest.run_main: fire and run_cli as a user's shell would reach
them, without a new interpreter's imports); a few run it as a real process (run_script) to check the process
itself: its exit status and that no traceback reaches the terminal."""

import json
import os

import pytest
from conftest import CLASS_NAMES, CORPUS, keyword_task, make_student_base, run_main, run_script, write_toy_cache

from zsdistill import cache


def assert_user_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for word in words:
        assert word in error_lines[0], (word, error_lines[0])


def no_valid_cache(cache_dir) -> bool:
    return (
        not any(cache.is_complete(os.path.join(cache_dir, d)) for d in os.listdir(cache_dir))
        if os.path.isdir(cache_dir)
        else True
    )


@pytest.fixture
def files(tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(CORPUS) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return tmp_path


def teacher_run(files, teacher, *extra, data="texts.txt", classes="classes.txt"):
    return run_main(
        "teacher_infer.py",
        "--data_file",
        files / data,
        "--class_names_file",
        files / classes,
        "--teacher_name_or_path",
        teacher,
        "--cache_dir",
        files / "cache",
        *extra,
    )


# 1. data files
@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["does not exist", "check the path"]),
        (b"", ["holds no examples", "empty"]),
        (b"\n   \n\n", ["holds no examples", "only blank lines"]),
        (b"fine line\nbad \xff\xfe bytes\n", ["line 2", "invalid UTF-8", "--encoding_errors replace"]),
    ],
)
def test_bad_data_file(files, teachers, content, words):
    if content is not None:
        (files / "bad.txt").write_bytes(content)
    assert_user_error(teacher_run(files, teachers["upper"], data="bad.txt"), *words)
    assert no_valid_cache(files / "cache")


def test_invalid_utf8_can_be_replaced(files, teachers):
    (files / "bad.txt").write_bytes(b"fine line\nbad \xff\xfe bytes\n")
    result = teacher_run(files, teachers["upper"], "--encoding_errors", "replace", data="bad.txt")
    assert result.returncode == 0, result.stderr
    assert "\ufffd" in json.dumps(
        cache.load_cache(result.stdout.strip().splitlines()[-1])[1].column("text").to_pylist(), ensure_ascii=False
    )


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_tabular_file_without_the_text_column(files, teachers, suffix):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.table({"body": CORPUS, "id": list(range(len(CORPUS)))})
    path = files / f"data.{suffix}"
    if suffix == "csv":
        pacsv.write_csv(table, str(path))
    elif suffix == "parquet":
        pq.write_table(table, str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    assert_user_error(teacher_run(files, teachers["upper"], data=path.name), "'text'", "'body'", "--text_column")


# 2. class names
@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["does not exist"]),
        ("", ["is empty"]),
        ("sports\nfinance\nsports\n", ["line 3", "duplicate class name 'sports'", "line 1"]),
        ("sports\n\nfinance\n", ["line 2", "blank class name"]),
    ],
)
def test_bad_class_names(files, teachers, content, words):
    if content is not None:
        (files / "bad_classes.txt").write_text(content)
    assert_user_error(teacher_run(files, teachers["upper"], classes="bad_classes.txt"), *words)
    assert no_valid_cache(files / "cache")


def test_one_class_is_fine_for_multi_label_only(files, teachers):
    (files / "one.txt").write_text("sports\n")
    result = teacher_run(files, teachers["upper"], classes="one.txt")
    assert result.returncode == 0, result.stderr
    cache_path = result.stdout.strip().splitlines()[-1]
    base = make_student_base(str(files / "base"))
    single = run_main(
        "train_student.py", "--cache", cache_path, "--output_dir", files / "single", "--student_name_or_path", base
    )
    assert_user_error(single, "at least 2 classes", "--multi_label")
    assert not (files / "single").exists()
    multi = run_main(
        "train_student.py",
        "--cache",
        cache_path,
        "--output_dir",
        files / "multi",
        "--student_name_or_path",
        base,
        "--multi_class",
        "--max_steps",
        "1",
        "--use_cpu",
        "--save_strategy",
        "no",
    )
    assert multi.returncode == 0, multi.stderr


# 3. templates
@pytest.mark.parametrize("template", ["This example is about sports.", "{} or {}", "This is {label}.", "This is {0}."])
def test_bad_template(files, teachers, template):
    assert_user_error(
        teacher_run(files, teachers["upper"], "--hypothesis_template", template),
        "--hypothesis_template",
        "exactly one '{}'",
    )
    assert no_valid_cache(files / "cache")


# 4. teachers
def test_teacher_without_entailment_label(files, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import bert_tokenizer

    path = str(tmp_path / "sentiment")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    BertForSequenceClassification(config).save_pretrained(path)
    bert_tokenizer().save_pretrained(path)
    assert_user_error(teacher_run(files, path), "no entailment label", "NEGATIVE, POSITIVE")
    assert no_valid_cache(files / "cache")


@pytest.mark.parametrize("name", ["./models/does-not-exist", "/no/such/dir/teacher", "not a/valid//id"])
def test_teacher_path_that_does_not_exist(files, name):
    result = teacher_run(files, name)
    assert_user_error(result, "does not exist locally and is not a hub model id")


def test_hub_id_offline_says_what_failed(files):
    result = run_script(
        "teacher_infer.py",
        "--data_file",
        files / "texts.txt",
        "--class_names_file",
        files / "classes.txt",
        "--teacher_name_or_path",
        "someone/no-such-model-zsdistill",
        "--cache_dir",
        files / "cache",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert_user_error(result, "fetching it from the Hugging Face hub failed")


# 5. temperature and holdout
@pytest.fixture
def toy_cache(tmp_path):
    texts, _, columns = keyword_task(30, ["apple", "river"])
    return write_toy_cache(str(tmp_path / "cache" / "toy"), texts, ["apple", "river"], columns, shard_size=10)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "warm"])
def test_bad_temperature(toy_cache, tmp_path, value):
    result = run_main(
        "train_student.py", "--cache", toy_cache, "--output_dir", tmp_path / "out", "--temperature", value
    )
    assert_user_error(result, "--temperature")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_bad_holdout_fraction(toy_cache, tmp_path, value):
    result = run_main(
        "train_student.py", "--cache", toy_cache, "--output_dir", tmp_path / "out", "--holdout_fraction", value
    )
    assert_user_error(result, "--holdout_fraction", "[0, 1)")


# 6. caches that are not, or not yet, or no longer valid
def test_not_a_cache(tmp_path):
    (tmp_path / "somedir").mkdir()
    result = run_main("train_student.py", "--cache", tmp_path / "somedir", "--output_dir", tmp_path / "out")
    assert_user_error(result, "is not a teacher cache", "teacher_infer.py")


def test_incomplete_cache_names_missing_shards_and_the_command(toy_cache, tmp_path):
    manifest = json.load(open(os.path.join(toy_cache, "manifest.json")))
    manifest["complete"] = False
    cache.write_json_atomic(os.path.join(toy_cache, "manifest.json"), manifest)
    os.unlink(os.path.join(toy_cache, "shard-00001.done.json"))
    result = run_main("train_student.py", "--cache", toy_cache, "--output_dir", tmp_path / "out")
    assert_user_error(result, "incomplete", "1 of 3 shards missing", "shard-00001.arrow", "python teacher_infer.py")


def test_corrupt_shard(toy_cache, tmp_path):
    path = os.path.join(toy_cache, "shard-00002.arrow")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    open(path, "wb").write(bytes(data))
    result = run_main("train_student.py", "--cache", toy_cache, "--output_dir", tmp_path / "out")
    assert_user_error(result, "corrupt", "shard-00002.arrow (checksum mismatch)")


def test_newer_format_version(toy_cache, tmp_path):
    manifest = json.load(open(os.path.join(toy_cache, "manifest.json")))
    manifest["format_version"] = cache.FORMAT_VERSION + 1
    cache.write_json_atomic(os.path.join(toy_cache, "manifest.json"), manifest)
    result = run_main("train_student.py", "--cache", toy_cache, "--output_dir", tmp_path / "out")
    assert_user_error(result, "newer than this zsdistill reads", "upgrade")
    manifest["format_version"] = 1  # older versions still read: version 2 only added columns
    cache.write_json_atomic(os.path.join(toy_cache, "manifest.json"), manifest)
    assert cache.load_cache(toy_cache)[0]["format_version"] == 1


# 7. output directories
def test_non_empty_output_dir(toy_cache, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = make_student_base(str(tmp_path / "base"))
    result = run_main("train_student.py", "--cache", toy_cache, "--output_dir", out, "--student_name_or_path", base)
    assert_user_error(result, "exists and is not empty", "--overwrite_output_dir")
    assert os.listdir(out) == ["notes.txt"]
    result = run_main(
        "train_student.py",
        "--cache",
        toy_cache,
        "--output_dir",
        out,
        "--student_name_or_path",
        base,
        "--overwrite_output_dir",
        "--max_steps",
        "1",
        "--use_cpu",
        "--save_strategy",
        "no",
    )
    assert result.returncode == 0, result.stderr
    assert os.path.exists(out / "config.json") and os.path.exists(out / "distill_info.json")


def test_resume_from_checkpoint_found_in_output_dir(toy_cache, tmp_path):
    import train_student

    base = make_student_base(str(tmp_path / "base"))
    out = tmp_path / "out"
    args = dict(
        cache=toy_cache,
        output_dir=str(out),
        student_name_or_path=base,
        use_cpu=True,
        per_device_train_batch_size=4,
        save_steps=2,
        disable_tqdm=True,
    )
    train_student.main(max_steps=2, **args)
    os.unlink(out / "distill_info.json")  # as if the run died after its checkpoint, before finishing
    os.unlink(out / "config.json")
    result = run_main(
        "train_student.py",
        "--cache",
        toy_cache,
        "--output_dir",
        out,
        "--student_name_or_path",
        base,
        "--max_steps",
        "4",
        "--use_cpu",
        "--per_device_train_batch_size",
        "4",
        "--save_steps",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr and "checkpoint-2" in result.stderr
    assert json.load(open(out / "distill_info.json"))["metrics"]["train"]["epoch"] > 0


# 8. evaluate.py
def test_evaluate_bad_inputs(toy_cache, tmp_path, embedding_teacher):
    import train_student

    student = train_student.main(
        cache=toy_cache,
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        max_steps=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    no_label = tmp_path / "nolabel.jsonl"
    no_label.write_text(json.dumps({"text": "apple pie", "topic": "apple"}) + "\n")
    assert_user_error(
        run_main("evaluate.py", "--model", student, "--test_file", no_label, "--output_dir", tmp_path / "r1"),
        "no key 'label'",
        "--label_column",
    )
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "apple pie", "label": "apple"}) + "\n")
    assert_user_error(
        run_main("evaluate.py", "--model", embedding_teacher, "--test_file", good, "--output_dir", tmp_path / "r2"),
        "not a sequence classifier",
    )
    assert_user_error(
        run_main("evaluate.py", "--model", tmp_path / "nothing", "--test_file", good, "--output_dir", tmp_path / "r3"),
        "not a model directory",
    )
    bracket = tmp_path / "bracket.csv"
    bracket.write_text('text,label\napple pie,"[apple"\n')
    assert_user_error(
        run_main("evaluate.py", "--model", student, "--test_file", bracket, "--output_dir", tmp_path / "r4"),
        "bracket.csv, row 1",
        "not a JSON list",
    )
    numbers = tmp_path / "numbers.csv"
    numbers.write_text('text,label\napple pie,"[1, 2]"\n')
    assert_user_error(
        run_main("evaluate.py", "--model", student, "--test_file", numbers, "--output_dir", tmp_path / "r5"),
        "must hold class names",
    )
    for report in ("r1", "r2", "r3", "r4", "r5"):
        assert not (tmp_path / report).exists()


# 9. long lines and other scripts
def test_long_lines_and_other_scripts(files, teachers, tmp_path):
    texts = [
        "x" * 100_000,
        "word " * 20_000,
        "日本語のテキストです。東京は大きな都市です。",
        "emoji 😀🎉🚀 party",
        "שלום עולם, זה טקסט בעברית",
        "مرحبا بالعالم",
    ]
    (files / "hard.txt").write_text("\n".join(texts) + "\n")
    for style in ("upper", "lower"):
        result = teacher_run(files, teachers[style], data="hard.txt")
        assert result.returncode == 0, result.stderr
        manifest, table = cache.load_cache(result.stdout.strip().splitlines()[-1])
        assert table.column("text").to_pylist() == texts and manifest["max_length"] == 64
    import train_student

    student = train_student.main(
        cache=result.stdout.strip().splitlines()[-1],
        output_dir=str(tmp_path / "student"),
        student_name_or_path=make_student_base(str(tmp_path / "base")),
        max_steps=1,
        use_cpu=True,
        save_strategy="no",
    )
    labeled = tmp_path / "hard.tsv"
    labeled.write_text("".join(f"{CLASS_NAMES[i % 6]}\t{t}\n" for i, t in enumerate(texts)))
    result = run_script("evaluate.py", "--model", student, "--test_file", labeled, "--output_dir", tmp_path / "report")
    assert result.returncode == 0, result.stderr


# 10. remote code
def test_remote_code_is_never_run_without_the_flag(files, tmp_path):
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "code-was-run"
    (model / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'zsdistill-custom'\n"
    )
    (model / "config.json").write_text(
        json.dumps({"model_type": "zsdistill-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}})
    )
    result = teacher_run(files, str(model))
    assert_user_error(result, "--trust_remote_code")
    assert not marker.exists()


# 11. class names never reach file names
def test_class_names_with_path_characters(files, teachers, tmp_path):
    (files / "evil.txt").write_text("../../escaped\na/b\n..\n/etc/passwd\n")
    before = {p for p in tmp_path.parent.rglob("*") if "cache" not in p.parts}
    result = teacher_run(files, teachers["upper"], classes="evil.txt")
    assert result.returncode == 0, result.stderr
    cache_path = result.stdout.strip().splitlines()[-1]
    assert os.path.dirname(cache_path) == str(files / "cache")
    after = {p for p in tmp_path.parent.rglob("*") if "cache" not in p.parts}
    assert after == before
    assert all(name.startswith(("shard-", "manifest", ".")) for name in os.listdir(cache_path))
    assert cache.load_cache(cache_path)[0]["class_names"] == ["../../escaped", "a/b", "..", "/etc/passwd"]


def _full_disk_on(monkeypatch, module, name: str, fail_when):
    """Make module.name write part of its file, then fail as a full disk does (ENOSPC), whenever fail_when(*args)."""
    import errno

    real = getattr(module, name)

    def failing(*args, **kwargs):
        if fail_when(*args):
            with cache.atomic_file(os.path.join(args[0], "partial-write"), "wb") as f:
                f.write(b"half a shard")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def test_full_disk_in_stage_1_is_one_line_and_the_rerun_completes_it(files, teachers, monkeypatch):
    args = ("--shard_size", "3")
    clean = teacher_run(files, teachers["upper"], *args)
    clean_path = clean.stdout.strip().splitlines()[-1]
    clean_shards = {
        s["file"]: s["sha256"] for s in json.load(open(os.path.join(clean_path, "manifest.json")))["shards"]
    }
    os.rename(files / "cache", files / "clean")

    _full_disk_on(monkeypatch, cache, "write_shard", lambda path, index, *_: index == 1)
    result = teacher_run(files, teachers["upper"], *args)
    assert_user_error(
        result,
        "cannot write the cache in",
        "No space left on device",
        "free space there or pass --cache_dir",
        "finished shards are kept",
    )
    path = os.path.join(files / "cache", os.path.basename(clean_path))
    assert path in result.stderr
    left = sorted(os.listdir(path))
    assert (
        "shard-00000.arrow" in left
        and "shard-00001.arrow" not in left
        and not any(n.startswith((".tmp", "partial")) for n in left)
    ), left
    assert not cache.is_complete(path)

    monkeypatch.undo()  # space freed: the same command completes it, computing only what is missing
    rerun = teacher_run(files, teachers["upper"], *args)
    assert rerun.returncode == 0 and rerun.stdout.strip().splitlines()[-1] == path
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert {s["file"]: s["sha256"] for s in manifest["shards"]} == clean_shards  # byte-identical shards


def test_full_disk_in_stages_2_and_3_is_one_line_with_nothing_half_written(toy_cache, tmp_path, monkeypatch):
    import evaluate
    import train_student

    _full_disk_on(monkeypatch, train_student.card, "write", lambda *a: True)
    base = make_student_base(str(tmp_path / "base"))
    result = run_main(
        "train_student.py",
        "--cache",
        toy_cache,
        "--output_dir",
        tmp_path / "student",
        "--student_name_or_path",
        base,
        "--max_steps",
        "1",
        "--use_cpu",
        "--save_strategy",
        "no",
    )
    assert_user_error(
        result, f"cannot write the student in {tmp_path / 'student'}", "No space left on device", "another --output_dir"
    )
    assert os.listdir(tmp_path / "student") == []  # no staging directory, no half a model

    _full_disk_on(monkeypatch, evaluate.cache_report, "write_plots", lambda *a: True)
    result = run_main("evaluate.py", "--teacher_cache", toy_cache, "--output_dir", tmp_path / "report")
    assert_user_error(result, f"cannot write the report in {tmp_path / 'report'}", "No space left on device")
    assert os.listdir(tmp_path / "report") == []
