"""The teacher cache: `<cache_dir>/<key>/manifest.json` plus Arrow IPC shards (schema in README).

Writing is crash-safe: a shard is written to a temporary name, fsynced and renamed, and only then gets
its completion record (`shard-NNNNN.done.json`, with row count and checksum). The manifest says
`"complete": true` only once every shard has one. Readers verify all of it.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from zsdistill.data import file_sha256
from zsdistill.errors import UserError

FORMAT_VERSION = 2  # 2: embedding caches keep a text_embedding column
MANIFEST = "manifest.json"


def cache_key(fields: dict) -> str:
    """Deterministic digest of everything the cached logits depend on."""
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def done_file(index: int) -> str:
    return f"shard-{index:05d}.done.json"


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator:
    """A file that appears at `path` complete or not at all: written under a temporary name, fsynced, renamed.

    mkstemp makes the temporary file owner-only (0600); it gets the permissions a plain open() would give
    (0666 less the umask), so a cache on a shared filesystem stays readable by the other users and nodes.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def write_json_atomic(path: str, obj: dict) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the process dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def list_array(values: np.ndarray) -> pa.Array:
    """(N, K) float array -> Arrow list<float32> column."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def list_column_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """Arrow list<float32> column -> (N, width) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(np.float32, copy=False)


def write_shard(cache_path: str, index: int, table: pa.Table, record: dict) -> dict:
    """Write shard `index` atomically, then its completion record; return that record."""
    final = os.path.join(cache_path, shard_file(index))
    with atomic_file(final, "wb") as f, ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    record = {
        "file": shard_file(index),
        **record,
        "rows": table.num_rows,
        "bytes": os.path.getsize(final),
        "sha256": file_sha256(final),
    }
    write_json_atomic(os.path.join(cache_path, done_file(index)), record)
    return record


def new_manifest(key: str, key_fields: dict, bounds: list[tuple[int, int]], **fields) -> dict:
    """A cache's manifest before its shards exist (`complete` false); `seal` completes it.

    `fields`: teacher, hypothesis_template, class_names, hypotheses, score_columns, text_embedding_column,
    embedding_model, precision, data, num_examples, shard_size, command, versions (docs/cache_format.md).
    """
    order = [
        "teacher",
        "hypothesis_template",
        "class_names",
        "hypotheses",
        "score_columns",
        "text_embedding_column",
        "embedding_model",
        "precision",
        "data",
        "num_examples",
        "shard_size",
    ]
    manifest = {"format_version": FORMAT_VERSION, "key": key, "complete": False, "key_fields": key_fields}
    manifest.update({name: fields[name] for name in order})
    manifest["shards"] = [
        {"file": shard_file(i), "start": a, "stop": b, "rows": b - a} for i, (a, b) in enumerate(bounds)
    ]
    manifest.update(command=fields["command"], versions=fields["versions"])
    return manifest


def begin(cache_path: str, manifest: dict) -> None:
    """Write the unsealed manifest (once, by one process), unless a complete one is already there."""
    os.makedirs(cache_path, exist_ok=True)
    with file_lock(os.path.join(cache_path, "manifest.lock")):
        if not (read_manifest(cache_path) or {}).get("complete"):
            write_json_atomic(os.path.join(cache_path, MANIFEST), manifest)


def seal(cache_path: str, manifest: dict, max_length: int | None) -> dict | None:
    """Once every shard has its completion record, mark the manifest complete with the records' totals.

    Returns the sealed manifest, or None when the cache was already complete (another run sealed it).
    """
    import datetime

    with file_lock(os.path.join(cache_path, "manifest.lock")):
        if is_complete(cache_path):
            return None
        records = [read_done_record(cache_path, i, s["start"], s["stop"]) for i, s in enumerate(manifest["shards"])]
        absent = [shard_file(i) for i, r in enumerate(records) if r is None]
        if absent:
            raise RuntimeError(f"shards {absent} have no valid completion record after all ranks finished")
        lengths = {r["max_length"] for r in records if r.get("max_length") is not None}
        sealed = {
            **manifest,
            "complete": True,
            "max_length": max(lengths) if lengths else max_length,
            "shards": records,
            "forward_passes": {
                "computed": sum(r["forward_passes"] for r in records),
                "reused_pairs": sum(r["reused_pairs"] for r in records),
                "saved_by_deduplication": sum(r.get("passes_saved_by_deduplication", 0) for r in records),
            },
            "duplicate_rows": sum(r.get("duplicate_rows", 0) for r in records),
            # None when a shard was written before zsdistill counted them (such shards are kept, not recomputed).
            "truncated_texts": sum(r["truncated_texts"] for r in records)
            if all("truncated_texts" in r for r in records)
            else None,
            "chunked_texts": sum(r.get("chunked_texts", 0) for r in records),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(os.path.join(cache_path, MANIFEST), sealed)
        return sealed


def read_done_record(cache_path: str, index: int, start: int, stop: int, verify: bool = True) -> dict | None:
    """The shard's completion record if the shard is complete and intact, else None."""
    record_path = os.path.join(cache_path, done_file(index))
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    # A record is untrusted input too: it must name its own shard, with sane counts, or it does not count.
    if not isinstance(record, dict) or record.get("file") != shard_file(index) or record.get("rows") != stop - start:
        return None
    shard_path = os.path.join(cache_path, shard_file(index))
    if record.get("start") != start or record.get("stop") != stop or not os.path.exists(shard_path):
        return None
    if os.path.getsize(shard_path) != record.get("bytes"):
        return None
    if verify and file_sha256(shard_path) != record.get("sha256"):
        return None
    return record


def read_manifest(cache_path: str) -> dict | None:
    try:
        with open(os.path.join(cache_path, MANIFEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def shard_problem(cache_path: str, shard: dict, verify: bool) -> str | None:
    """What is wrong with a sealed manifest's shard file ('missing', 'checksum mismatch'), or None."""
    path = os.path.join(cache_path, shard["file"])
    if not os.path.exists(path):
        return "missing"
    if os.path.getsize(path) != shard["bytes"] or (verify and file_sha256(path) != shard["sha256"]):
        return "checksum mismatch"
    return None


def is_complete(cache_path: str, expected: dict | None = None, verify: bool = False) -> bool:
    """Complete and valid manifest, every shard present with its size (and checksum, with `verify`).

    `expected`: manifest fields the caller knows (stage 1 knows its key, classes and row count); a manifest
    that disagrees was not made by this command and is refused.
    """
    try:
        manifest = read_manifest(cache_path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(
            f"{os.path.join(cache_path, MANIFEST)} is not valid JSON; delete {cache_path} and rerun to rebuild it"
        ) from None
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        return False
    validate_manifest(cache_path, manifest)
    for name, value in (expected or {}).items():
        if manifest.get(name) != value:
            raise UserError(
                f"cache {cache_path}: {MANIFEST} does not match the cache's key (its {name} differ); it was not "
                f"written by "
                f"this command or was damaged: delete {cache_path} and rerun to rebuild it"
            )
    return not any(shard_problem(cache_path, shard, verify) for shard in manifest["shards"])


def validate_manifest(cache_path: str, manifest: dict) -> None:
    """Treat a manifest as untrusted input: types, counts and shard names must be what teacher_infer.py writes.

    A violation is a one-line UserError that names only the cache directory (never a path the manifest gives).
    """

    def refuse(problem: str):
        raise UserError(
            f"cache {cache_path}: {MANIFEST} is invalid ({problem}); it was not written by teacher_infer.py or was "
            f"damaged: delete {cache_path} and rerun the teacher command to rebuild it"
        )

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(manifest, dict):
        refuse("not a JSON object")
    expected = {
        "format_version": int,
        "class_names": list,
        "hypotheses": list,
        "score_columns": list,
        "num_examples": int,
        "shards": list,
        "teacher": dict,
        "complete": bool,
    }
    for name, kind in expected.items():
        if name not in manifest:
            refuse(f"no field {name!r}")
        if not isinstance(manifest[name], kind) or (kind is int and isinstance(manifest[name], bool)):
            refuse(f"field {name!r} is not a {kind.__name__}")
    class_names, num_examples = manifest["class_names"], manifest["num_examples"]
    if (
        not class_names
        or not all(isinstance(c, str) and c for c in class_names)
        or len(set(class_names)) != len(class_names)
    ):
        refuse("class_names must be distinct non-empty strings")
    if len(manifest["hypotheses"]) != len(class_names) or not all(isinstance(h, str) for h in manifest["hypotheses"]):
        refuse(f"{len(manifest['hypotheses'])} hypotheses for {len(class_names)} classes")
    if not manifest["score_columns"] or not all(
        isinstance(c, str) and c.isidentifier() for c in manifest["score_columns"]
    ):
        refuse("score_columns must be column names")
    embedding_column = manifest.get("text_embedding_column")
    if embedding_column is not None and not (isinstance(embedding_column, str) and embedding_column.isidentifier()):
        refuse("text_embedding_column must be a column name")
    if manifest["teacher"].get("kind") not in ("nli", "embedding"):
        refuse("teacher.kind must be 'nli' or 'embedding'")
    if num_examples < 0:
        refuse("num_examples is negative")
    expected_start = 0
    for index, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            refuse(f"shard {index} is not an object")
        name = shard.get("file")
        if name != shard_file(index):  # a bare name inside the cache, and the right one
            refuse(f"shard {index} does not name its file shard-{index:05d}.arrow inside the cache directory")
        counts = [shard.get(k) for k in ("start", "stop", "rows")]
        if not all(is_int(c) and c >= 0 for c in counts):
            refuse(f"shard {index}: start, stop and rows must be non-negative integers")
        start, stop, rows = counts
        if start != expected_start or stop <= start or rows != stop - start:
            refuse(f"shard {index}: rows {start}-{stop} ({rows}) do not follow the previous shard")
        if manifest["complete"] and (
            not is_int(shard.get("bytes")) or shard["bytes"] < 0 or not isinstance(shard.get("sha256"), str)
        ):
            refuse(f"shard {index}: bytes and sha256 are missing or invalid")
        expected_start = stop
    if expected_start != num_examples:
        refuse(f"the shards hold rows 0-{expected_start}, num_examples is {num_examples}")


def check_widths(cache_path: str, manifest: dict, table: pa.Table) -> None:
    """Every score column holds one value per class, every text embedding the same number of values."""
    for name in manifest["score_columns"] + (
        [manifest["text_embedding_column"]] if manifest.get("text_embedding_column") else []
    ):
        if name not in table.column_names:
            raise UserError(
                f"cache {cache_path}: the shards have no column {name!r} that {MANIFEST} names; delete {cache_path} "
                f"and rerun the teacher command"
            )
        if table.num_rows == 0:
            continue
        lengths = pc.min_max(pc.list_value_length(table.column(name))).as_py()
        width = len(manifest["class_names"]) if name in manifest["score_columns"] else lengths["max"]
        if lengths["min"] != width or lengths["max"] != width:
            raise UserError(
                f"cache {cache_path}: column {name!r} holds {lengths['min']}-{lengths['max']} values per row, "
                f"expected {width} "
                f"({'one per class' if name in manifest['score_columns'] else 'the same for every text'}); delete "
                f"{cache_path} and rerun the teacher command"
            )


def open_table(cache_path: str, manifest: dict) -> pa.Table:
    """The whole cache as one Arrow table, memory-mapped (no copy into RAM)."""
    tables = [
        ipc.open_stream(pa.memory_map(os.path.join(cache_path, s["file"]))).read_all() for s in manifest["shards"]
    ]
    return pa.concat_tables(tables)


def load_cache(cache_path: str, verify: bool = True) -> tuple[dict, pa.Table]:
    """Open a complete cache for reading; refuse anything missing, corrupt or from a newer format."""
    if not os.path.isdir(cache_path):
        raise UserError(f"cache {cache_path!r} does not exist: pass the directory teacher_infer.py printed")
    try:
        manifest = read_manifest(cache_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{os.path.join(cache_path, MANIFEST)} is not valid JSON ({e}); rerun teacher_infer.py to rebuild it"
        ) from None
    if manifest is None:
        raise UserError(
            f"{cache_path!r} is not a teacher cache (no {MANIFEST}); pass the directory that teacher_infer.py printed, "
            f"e.g. cache/<key>"
        )
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{cache_path}: cache format version {version!r} is newer than this zsdistill reads ({FORMAT_VERSION}); "
            f"upgrade zsdistill"
        )
    validate_manifest(cache_path, manifest)
    command = manifest.get("command")
    command = command if isinstance(command, str) else "the teacher_infer.py command that made it"
    if not manifest.get("complete"):
        missing = [
            s["file"]
            for i, s in enumerate(manifest["shards"])
            if read_done_record(cache_path, i, s["start"], s["stop"], verify=False) is None
        ]
        raise UserError(
            f"cache {cache_path} is incomplete: {len(missing)} of {len(manifest['shards'])} shards missing "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); complete it by rerunning: {command}"
        )
    bad = [
        f"{shard['file']} ({problem})"
        for shard in manifest["shards"]
        if (problem := shard_problem(cache_path, shard, verify))
    ]
    if bad:
        raise UserError(
            f"cache {cache_path} is corrupt: {', '.join(bad)}; delete those files and their .done.json records, "
            f"then rerun: {command}"
        )
    try:
        table = open_table(cache_path, manifest)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(
            f"cache {cache_path}: a shard is not a readable Arrow stream ({str(e).splitlines()[0][:200]}); delete "
            f"{cache_path} and rerun: {command}"
        ) from None
    if table.num_rows != manifest["num_examples"]:
        raise UserError(
            f"cache {cache_path}: shards hold {table.num_rows} rows, manifest says {manifest['num_examples']}; rerun: "
            f"{command}"
        )
    check_widths(cache_path, manifest, table)
    return manifest, table


def list_width(table: pa.Table, name: str) -> int:
    """Width of a list<float32> column (0 for an empty table)."""
    column = table.column(name)
    return pc.list_value_length(column.slice(0, 1)).to_pylist()[0] if len(column) else 0


def iter_shards(cache_path: str, manifest: dict, columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
    """(first row, table of `columns`) for each shard in order, read with plain file reads.

    Passes over a whole cache use this rather than the memory-mapped table: pages touched through a memory map
    stay in the process's resident memory, so a pass over a million rows of embeddings would grow it by
    gigabytes; here memory is one shard at a time, whatever the cache's size.
    """
    for shard in manifest["shards"]:
        with pa.OSFile(os.path.join(cache_path, shard["file"])) as f:
            table = ipc.open_stream(f).read_all().select(columns)
        yield shard["start"], table


def column_chunks(cache_path: str, manifest: dict, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (rows, width) float32 array) of a list<float32> column, one shard at a time."""
    for start, table in iter_shards(cache_path, manifest, [name]):
        yield start, list_column_to_numpy(table.column(name), list_width(table, name))


def score_arrays(manifest: dict, table: pa.Table) -> dict[str, np.ndarray]:
    """Every per-class score column of the cache as an (N, K) array."""
    width = len(manifest["class_names"])
    return {name: list_column_to_numpy(table.column(name), width) for name in manifest["score_columns"]}
