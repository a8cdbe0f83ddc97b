"""Stage 1: run a zero-shot teacher over an unlabeled corpus once and cache its raw scores.

    python teacher_infer.py --data_file texts.txt --class_names_file classes.txt
    torchrun --nproc_per_node 4 teacher_infer.py --data_file ... --class_names_file ...

The cache is `<cache_dir>/<key>/`: manifest.json plus Arrow shards (schema in README). The last line
printed on stdout is that directory. Rerunning the same command is a cache hit (nothing is loaded or
recomputed); after a crash it computes only the missing shards; with more class names it computes only
the new hypotheses and reuses the rest from earlier caches of the same data and teacher.
"""

import contextlib
import datetime
import glob
import importlib.metadata
import os
import platform
import shlex
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from zsdistill import __version__, cache, data
from zsdistill import teacher as zs_teacher
from zsdistill.errors import UserError, run_cli

DEFAULTS = dict(
    teacher_name_or_path="roberta-large-mnli",
    hypothesis_template="This example is {}.",
    teacher_batch_size=None,  # None: zsdistill.teacher.default_batches(device)
    max_batch_tokens=None,
    cache_dir="cache",
    max_length=None,
    text_column="text",
    shard_size=10_000,
    fp16=False,
    bf16=False,
    no_cuda=False,
    teacher_kind=None,
    embedding_model=None,
    teacher_revision=None,
    trust_remote_code=False,
    encoding_errors="strict",
)


def log(message: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    prefix = f"[teacher rank {rank}]" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "[teacher]"
    print(f"{prefix} {message}", file=sys.stderr, flush=True)


def _positive_int(value, flag: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _command(params: dict) -> str:
    """The command line that (re)makes this cache: how readers tell a user to complete it."""
    args = ["python", "teacher_infer.py", "--data_file", params["data_file"], "--class_names_file", params["class_names_file"]]
    for name, default in DEFAULTS.items():
        value = params[name]
        if value != default:
            args += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return shlex.join(map(str, args))


def _versions() -> dict:
    versions = {"python": platform.python_version(), "zsdistill": __version__}
    for package in ("torch", "transformers", "pyarrow", "datasets", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@contextlib.contextmanager
def gpu_memory_advice(pairs: int, tokens: int):
    """A GPU out-of-memory error is a setting to change, not a crash: say which one."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory with batches of up to {pairs} pairs and {tokens} padded tokens; "
            f"lower --max_batch_tokens (e.g. to {max(tokens // 4, 512)}) and --teacher_batch_size; the shards already written are kept"
        ) from None


def find_reusable(
    cache_dir: str, key: str, key_fields: dict, hypotheses: list[str], score_columns: list[str], text_embedding_column: str | None
) -> dict:
    """Hypotheses already scored by another complete cache of the same data and teacher: {hypothesis: (path, position)}."""
    identity = {k: v for k, v in key_fields.items() if k not in ("class_names", "hypothesis_template")}
    reusable: dict[str, tuple[str, int]] = {}
    for manifest_path in sorted(glob.glob(os.path.join(cache_dir, "*", cache.MANIFEST))):
        path = os.path.dirname(manifest_path)
        try:
            manifest = cache.read_manifest(path)
        except ValueError:
            continue
        if os.path.basename(path) == key or not isinstance(manifest, dict) or not manifest.get("complete"):
            continue
        try:
            cache.validate_manifest(path, manifest)  # a donor is untrusted input like any cache
        except UserError as e:
            log(f"not reusing scores from {path}: {e}")
            continue
        donor_identity = {k: v for k, v in manifest.get("key_fields", {}).items() if k not in ("class_names", "hypothesis_template")}
        if (
            donor_identity != identity
            or manifest.get("score_columns") != score_columns
            or manifest.get("text_embedding_column") != text_embedding_column
        ):
            continue
        for position, hypothesis in enumerate(manifest["hypotheses"]):
            if hypothesis in hypotheses and hypothesis not in reusable:
                reusable[hypothesis] = (path, position)
    return reusable


def main(
    *,
    data_file: str,
    class_names_file: str,
    teacher_name_or_path: str = DEFAULTS["teacher_name_or_path"],
    hypothesis_template: str = DEFAULTS["hypothesis_template"],
    teacher_batch_size: int = DEFAULTS["teacher_batch_size"],
    max_batch_tokens: int = DEFAULTS["max_batch_tokens"],
    cache_dir: str = DEFAULTS["cache_dir"],
    max_length: int | None = DEFAULTS["max_length"],
    text_column: str = DEFAULTS["text_column"],
    shard_size: int = DEFAULTS["shard_size"],
    fp16: bool = DEFAULTS["fp16"],
    bf16: bool = DEFAULTS["bf16"],
    no_cuda: bool = DEFAULTS["no_cuda"],
    teacher_kind: str | None = DEFAULTS["teacher_kind"],
    embedding_model: str | None = DEFAULTS["embedding_model"],
    teacher_revision: str | None = DEFAULTS["teacher_revision"],
    trust_remote_code: bool = DEFAULTS["trust_remote_code"],
    encoding_errors: str = DEFAULTS["encoding_errors"],
) -> str:
    """Score every (text, class) pair with a zero-shot teacher and cache the raw logits.

    Args:
        data_file: unlabeled texts: .txt (one per line; blank lines skipped), .csv, .jsonl or .parquet.
        class_names_file: one class name per line, in the order the cache's columns will use.
        teacher_name_or_path: NLI model (hub id or directory), or a sentence-embedding model.
        hypothesis_template: hypothesis per class; exactly one {} stands for the class name.
        teacher_batch_size: at most this many (text, class) pairs per forward pass (default: 32 on CPU, 256 on GPU).
        max_batch_tokens: at most this many padded tokens per forward pass (default: 8192 on CPU, 65536 on GPU).
        cache_dir: where cache directories are made; each is named by a digest of its inputs.
        max_length: truncate pairs to this many tokens (premise only); default: the teacher's maximum.
        text_column: column holding the text in .csv/.jsonl/.parquet inputs.
        shard_size: examples per Arrow shard (the unit of resume and of work split across ranks).
        fp16: fp16 autocast (GPU only).
        bf16: bf16 autocast (GPU, or CPUs with bf16 support; never the CPU default).
        no_cuda: run on the CPU even when a GPU is present.
        teacher_kind: force 'nli' or 'embedding' (default: detected from the model's config).
        embedding_model: NLI teachers: also keep each text's embedding from this sentence-embedding model (one
            pass per text), which stage 2's label-free refinement needs. Embedding teachers keep their own.
        teacher_revision: hub revision (branch, tag or commit) of the teacher.
        trust_remote_code: allow models whose code lives in their hub repository.
        encoding_errors: 'strict' (default: invalid UTF-8 is an error), 'replace' or 'ignore'.
    """
    params = dict(locals())
    started = time.time()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # 1. Validate everything cheap before any expensive work.
    data.check_template(str(hypothesis_template))
    class_names = data.read_class_names(str(class_names_file))
    _positive_int(teacher_batch_size, "--teacher_batch_size", allow_none=True)
    _positive_int(max_batch_tokens, "--max_batch_tokens", allow_none=True)
    _positive_int(shard_size, "--shard_size")
    _positive_int(max_length, "--max_length", allow_none=True)
    num_examples, data_fingerprint = data.scan_texts(str(data_file), str(text_column), encoding_errors)
    teacher = zs_teacher.resolve_teacher(str(teacher_name_or_path), teacher_revision, teacher_kind, trust_remote_code)
    device = zs_teacher.select_device(no_cuda)
    precision = zs_teacher.check_precision(fp16, bf16, device)
    default_pairs, default_tokens = zs_teacher.default_batches(device)
    teacher_batch_size, max_batch_tokens = teacher_batch_size or default_pairs, max_batch_tokens or default_tokens
    hypotheses = [hypothesis_template.format(name) for name in class_names]
    score_columns = list(teacher.label_columns) if teacher.kind == "nli" else ["similarity"]
    # An embedding cache also keeps each text's embedding: a later run with more classes then embeds only them,
    # and stage 2 refines its targets in that space. An NLI cache keeps them when --embedding_model names a model.
    embedder = None
    if embedding_model is not None:
        if teacher.kind == "embedding":
            raise UserError("--embedding_model is for NLI teachers: an embedding teacher's cache already keeps its own text embeddings; drop the flag")
        embedder = zs_teacher.resolve_teacher(str(embedding_model), kind="embedding", trust_remote_code=trust_remote_code)
    text_embedding_column = "text_embedding" if teacher.kind == "embedding" or embedder else None

    # 2. The key: everything the scores depend on. Same key, same scores: a complete cache is a hit.
    key_fields = {
        "format_version": cache.FORMAT_VERSION,
        "data_fingerprint": data_fingerprint,
        "num_examples": num_examples,
        "teacher": teacher.fingerprint,
        "teacher_kind": teacher.kind,
        "hypothesis_template": hypothesis_template,
        "class_names": class_names,
        "max_length": max_length,
        "precision": precision,
    }
    if embedder:  # only when given, so caches made without it keep their keys
        key_fields["embedding_model"] = embedder.fingerprint
    key = cache.cache_key(key_fields)
    cache_path = os.path.join(str(cache_dir), key)
    expected = {"key": key, "class_names": class_names, "hypotheses": hypotheses, "num_examples": num_examples, "score_columns": score_columns}
    if cache.is_complete(cache_path, expected, verify=True):
        log(f"cache hit: {cache_path} already holds {num_examples} examples x {len(class_names)} classes; nothing to do")
        if rank == 0:
            print(cache_path)
        return cache_path

    if world_size > 1:
        # Only a barrier crosses ranks, so gloo serves CPUs and GPUs alike; ranks may finish hours apart.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    os.makedirs(cache_path, exist_ok=True)

    # 3. The plan: fixed shard boundaries, shard i belongs to rank i % world_size.
    bounds = [(start, min(start + shard_size, num_examples)) for start in range(0, num_examples, shard_size)]
    manifest = {
        "format_version": cache.FORMAT_VERSION,
        "key": key,
        "complete": False,
        "key_fields": key_fields,
        "teacher": teacher.describe(),
        "hypothesis_template": hypothesis_template,
        "class_names": class_names,
        "hypotheses": hypotheses,
        "score_columns": score_columns,
        "text_embedding_column": text_embedding_column,
        "embedding_model": embedder.describe() if embedder else None,
        "precision": precision,
        "data": {"path": os.path.abspath(data_file), "text_column": text_column, "fingerprint": data_fingerprint},
        "num_examples": num_examples,
        "shard_size": shard_size,
        "shards": [{"file": cache.shard_file(i), "start": a, "stop": b, "rows": b - a} for i, (a, b) in enumerate(bounds)],
        "command": _command(params),
        "versions": _versions(),
    }
    if rank == 0:
        with cache.file_lock(os.path.join(cache_path, "manifest.lock")):
            if not (cache.read_manifest(cache_path) or {}).get("complete"):
                cache.write_json_atomic(os.path.join(cache_path, cache.MANIFEST), manifest)

    # 4. Scores other caches already hold for these hypotheses (same data, teacher and settings).
    reusable = find_reusable(str(cache_dir), key, key_fields, hypotheses, score_columns, text_embedding_column)
    missing = [h for h in hypotheses if h not in reusable]
    missing_positions = [hypotheses.index(h) for h in missing]
    if reusable:
        log(f"reusing {len(reusable)} of {len(hypotheses)} hypotheses from earlier caches; computing {len(missing)}")
    reuse_by_donor: dict[str, tuple[list[int], list[int]]] = {}  # donor cache -> (our positions, its positions)
    for position, hypothesis in enumerate(hypotheses):
        if hypothesis in reusable:
            donor_path, donor_position = reusable[hypothesis]
            ours, theirs = reuse_by_donor.setdefault(donor_path, ([], []))
            ours.append(position)
            theirs.append(donor_position)
    donor_tables: dict[str, tuple[dict, pa.Table]] = {}

    # 5. Walk the data once, in order; compute each of this rank's shards that is not already complete.
    model = encoder = tokenizer = hypothesis_ids = hypothesis_embeddings = None
    embedder_model = embedder_tokenizer = embedder_max_length = None
    effective_max_length = None
    stats = zs_teacher.Stats()
    my_shards = [i for i in range(len(bounds)) if i % world_size == rank]
    my_rows = sum(bounds[i][1] - bounds[i][0] for i in my_shards)
    shards_done_before = shards_computed = 0
    compute_seconds = 0.0
    progress = tqdm(total=my_rows, unit="ex", desc=f"teacher rank {rank}" if world_size > 1 else "teacher", mininterval=1.0, smoothing=0.1, dynamic_ncols=True)
    texts_iter = data.iter_texts(str(data_file), str(text_column), encoding_errors)
    for index, (start, stop) in enumerate(bounds):
        texts = [next(texts_iter) for _ in range(stop - start)]
        if index % world_size != rank:
            continue
        with cache.file_lock(os.path.join(cache_path, f"shard-{index:05d}.lock")), gpu_memory_advice(teacher_batch_size, max_batch_tokens):
            if cache.read_done_record(cache_path, index, start, stop) is not None:
                shards_done_before += 1
                progress.update(stop - start)
                continue
            passes_before, shard_started = stats.forward_passes, time.time()
            scores = {name: np.empty((stop - start, len(hypotheses)), dtype=np.float32) for name in score_columns}
            text_embeddings = None
            for donor_path, (positions, donor_positions) in reuse_by_donor.items():
                if donor_path not in donor_tables:
                    donor_tables[donor_path] = cache.load_cache(donor_path)  # verified once, memory-mapped
                donor_manifest, donor_table = donor_tables[donor_path]
                rows = donor_table.slice(start, stop - start)
                for name in score_columns:
                    values = cache.list_column_to_numpy(rows.column(name), len(donor_manifest["class_names"]))
                    scores[name][:, positions] = values[:, donor_positions]
                if text_embedding_column and text_embeddings is None:  # any donor will do: same texts, teacher and settings
                    column = rows.column(text_embedding_column)
                    text_embeddings = cache.list_column_to_numpy(column, pc.list_value_length(column)[0].as_py())
            if missing:
                if model is None:
                    log(f"loading teacher {teacher.name_or_path} ({teacher.kind}) on {device}, {precision}")
                    model, tokenizer = zs_teacher.load_model(teacher, device, trust_remote_code)
                    effective_max_length = zs_teacher.resolve_max_length(tokenizer, model, max_length)
                    if teacher.kind == "nli":
                        encoder = zs_teacher.PairEncoder(tokenizer, effective_max_length)
                        hypothesis_ids = encoder.tokenize(missing)
                    else:
                        hypothesis_embeddings = zs_teacher.embed(
                            model, tokenizer, missing, effective_max_length, teacher_batch_size, max_batch_tokens, teacher.pooling, precision, stats
                        )
                if teacher.kind == "nli":
                    per_pair, rate_started, rate_passes = 1.0 / len(missing), time.time(), stats.forward_passes

                    def on_batch(pairs: int) -> None:
                        progress.update(pairs * per_pair)
                        progress.set_postfix_str(f"{(stats.forward_passes - rate_passes) / max(time.time() - rate_started, 1e-9):.1f} pairs/s", refresh=False)

                    logits = zs_teacher.nli_logits(
                        model, encoder, encoder.tokenize(texts), hypothesis_ids, teacher_batch_size, max_batch_tokens, precision, stats, on_batch
                    )
                    for name, label_index in teacher.label_columns.items():
                        scores[name][:, missing_positions] = logits[:, :, label_index]
                else:
                    if text_embeddings is None:
                        text_embeddings = zs_teacher.embed(
                            model, tokenizer, texts, effective_max_length, teacher_batch_size, max_batch_tokens, teacher.pooling, precision, stats,
                            on_batch=progress.update,
                        )
                    else:
                        progress.update(stop - start)
                    scores["similarity"][:, missing_positions] = text_embeddings @ hypothesis_embeddings.T
                # Snap progress to whole examples (pairs / K leaves float rounding behind).
                progress.n = round(progress.n)
            else:
                progress.update(stop - start)
            if embedder and text_embeddings is None:
                if embedder_model is None:
                    log(f"loading embedding model {embedder.name_or_path} on {device}, {precision}")
                    embedder_model, embedder_tokenizer = zs_teacher.load_model(embedder, device, trust_remote_code)
                    embedder_max_length = zs_teacher.resolve_max_length(embedder_tokenizer, embedder_model, None)
                text_embeddings = zs_teacher.embed(
                    embedder_model, embedder_tokenizer, texts, embedder_max_length, teacher_batch_size, max_batch_tokens, embedder.pooling, precision, stats
                )
            table = pa.table(
                {
                    "index": pa.array(np.arange(start, stop, dtype=np.int64)),
                    "text": pa.array(texts, pa.string()),
                    **{name: cache.list_array(values) for name, values in scores.items()},
                    **({text_embedding_column: cache.list_array(text_embeddings)} if text_embedding_column else {}),
                }
            )
            record = {
                "start": start,
                "stop": stop,
                "forward_passes": stats.forward_passes - passes_before,
                "reused_pairs": (stop - start) * len(reusable),
                "max_length": effective_max_length,
            }
            cache.write_shard(cache_path, index, table, record)
            shards_computed += 1
            compute_seconds += time.time() - shard_started
    progress.close()
    log(
        f"this process: {shards_computed} shards computed ({stats.forward_passes} forward passes in {compute_seconds:.1f}s, "
        f"{stats.forward_passes / max(compute_seconds, 1e-9):.1f}/s), "
        f"{shards_done_before} shards already complete and reused"
        + (f"; padding {1 - stats.tokens / stats.padded_tokens:.1%} of tokens" if stats.padded_tokens else "")
    )

    # 6. Once every rank is done, one process seals the manifest.
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        with cache.file_lock(os.path.join(cache_path, "manifest.lock")):
            if not cache.is_complete(cache_path):
                records = [cache.read_done_record(cache_path, i, a, b) for i, (a, b) in enumerate(bounds)]
                absent = [cache.shard_file(i) for i, r in enumerate(records) if r is None]
                if absent:
                    raise RuntimeError(f"shards {absent} have no valid completion record after all ranks finished")
                lengths = {r["max_length"] for r in records if r.get("max_length") is not None}
                manifest.update(
                    complete=True,
                    max_length=max(lengths) if lengths else max_length,
                    shards=records,
                    forward_passes={
                        "computed": sum(r["forward_passes"] for r in records),
                        "reused_pairs": sum(r["reused_pairs"] for r in records),
                    },
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                )
                cache.write_json_atomic(os.path.join(cache_path, cache.MANIFEST), manifest)
                log(
                    f"wrote {cache_path}: {num_examples} examples x {len(class_names)} classes in {len(bounds)} shards, "
                    f"{manifest['forward_passes']['computed']} forward passes computed, "
                    f"{manifest['forward_passes']['reused_pairs']} pairs reused, {time.time() - started:.1f}s"
                )
        print(cache_path)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return cache_path


if __name__ == "__main__":
    run_cli(main)
