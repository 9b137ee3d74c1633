"""Read, tokenize and store a data source in bounded memory, or take it from the cache.

Rows stream from the reader in chunks of CHUNK_ROWS; each chunk is tokenized (encode.py) and appended to a store
on disk (store.py), so memory holds a few chunks whatever the file size. With data.cache the store is written
under the cache key and reused by later runs; without it, it lives in a temporary directory removed once mapped.
Chunks are tokenized in order, in this process (the Rust tokenizer on every core, overlapped with rendering the next
chunk) or in data.num_proc worker processes; either way the result is the same as tokenizing row by row.
"""

import itertools
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from velotune.data.cache import cache_key, cache_root, tokenizer_fingerprint
from velotune.data.config import DataConfig
from velotune.data.encode import Encoded, RowEncoder
from velotune.data.formats import apply_field_map, detect_format
from velotune.data.readers import Rows
from velotune.data.sources import RowSource
from velotune.data.store import StoreWriter, TokenStore, id_dtype_for
from velotune.data.templates import builtin_template
from velotune.errors import DataError

CHUNK_ROWS = 2048
STALE_SECONDS = 24 * 3600
Chunk = tuple[list[tuple[str, dict]], Exception | None]  # rows, and the reader's error after them


@dataclass
class Tokenized:
    """A tokenized source and how it was obtained."""

    store: TokenStore
    seconds: float  # tokenizing (or loading from the cache) took
    cache_hit: bool
    cache_path: str  # the store's directory ("" when not cached)
    cache_note: str = ""  # why the cache was not used, when it was asked for


def chunks(rows: Rows, size: int | None = None) -> Iterator[Chunk]:
    """Rows in lists of `size` (default CHUNK_ROWS); a reader error ends the stream, handed on with the rows before
    it."""
    size = size or CHUNK_ROWS
    while True:
        batch: list[tuple[str, dict]] = []
        try:
            for item in itertools.islice(rows, size):
                batch.append(item)
        except DataError as e:
            yield batch, e
            return
        if not batch:
            return
        yield batch, None


def _in_process(encoder: RowEncoder, stream: Iterator[Chunk]) -> Iterator[tuple[int, Encoded]]:
    """Encode chunks here: while the tokenizer (GIL released) encodes chunk k, chunk k+1 is rendered."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for rows, error in stream:
            prepared = encoder.prepare(rows, error)
            future = pool.submit(encoder.encode_texts, prepared)
            if pending is not None:
                yield pending[0], encoder.assemble(pending[1], pending[2].result())
            pending = (len(rows), prepared, future)
            if prepared.error is not None:
                break
        if pending is not None:
            yield pending[0], encoder.assemble(pending[1], pending[2].result())


_worker_encoder: RowEncoder | None = None


def _start_worker(encoder: RowEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(chunk: Chunk) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder.encode(*chunk)


def _in_workers(encoder: RowEncoder, stream: Iterator[Chunk], num_proc: int) -> Iterator[tuple[int, Encoded]]:
    """Encode chunks in `num_proc` spawned processes, at most 2 per process in flight, results in order."""
    context = multiprocessing.get_context("spawn")  # fork would copy a tokenizer whose thread pool is running
    with context.Pool(num_proc, initializer=_start_worker, initargs=(encoder,)) as pool:
        in_flight: deque = deque()
        for rows, error in stream:
            in_flight.append((len(rows), pool.apply_async(_encode_in_worker, ((rows, error),))))
            if len(in_flight) >= 2 * num_proc:
                n, result = in_flight.popleft()
                yield n, result.get()
            if error is not None:
                break
        while in_flight:
            n, result = in_flight.popleft()
            yield n, result.get()


def _first_row(rows: Rows, path: str) -> tuple[tuple[str, dict], Rows]:
    try:
        first = next(rows)
    except StopIteration:
        raise DataError(f"{path}: no rows found; the file is empty (or holds only blank lines)") from None
    return first, itertools.chain([first], rows)


def _write(source: RowSource, cfg: DataConfig, tokenizer, directory: Path, name: str, progress: bool) -> float:
    """Tokenize every row of `source` into a store at `directory`; returns the seconds it took."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    (first_source, first_row), rows = _first_row(source.rows(), source.path)
    fmt = cfg.format if cfg.format != "auto" else detect_format(apply_field_map(first_row, cfg.field_map), first_source)
    id_dtype = id_dtype_for(tokenizer)
    encoder = RowEncoder(tokenizer, fmt, cfg, id_dtype)
    writer = StoreWriter(directory, id_dtype)
    stream = chunks(rows)
    encoded = _in_workers(encoder, stream, cfg.num_proc) if cfg.num_proc > 1 else _in_process(encoder, stream)
    try:
        with tqdm(desc=f"tokenizing {name}", unit=" rows", disable=not progress, mininterval=0.5) as bar:
            for n, chunk in encoded:
                writer.append(chunk)
                bar.update(n)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    writer.finish({"format": fmt, "seconds": seconds, "source": source.path}, source.path)
    return seconds


def _remove_stale(root: Path) -> None:
    """Remove work directories that runs killed mid-way left behind (no file written for STALE_SECONDS)."""
    if not root.is_dir():
        return
    for work in root.glob(".*.tmp"):
        try:
            touched = max([work.stat().st_mtime] + [f.stat().st_mtime for f in work.iterdir()])
            if time.time() - touched > STALE_SECONDS:
                shutil.rmtree(work, ignore_errors=True)
        except OSError:
            pass


def tokenize_source(source: RowSource, cfg: DataConfig, tokenizer, name: str, progress: bool = False) -> Tokenized:
    """The tokenized rows of `source`: from the cache when an entry for the same inputs exists, else tokenized now
    (and cached when cfg.cache)."""
    start = time.perf_counter()
    root, note = cache_root(cfg), ""
    entry = None
    if cfg.cache:
        try:
            fingerprint = source.fingerprint(root)
        except OSError as e:
            fingerprint, note = None, f"cannot fingerprint {source.path}: {e}"
        if fingerprint is not None:
            template = builtin_template(cfg.template).source if cfg.template is not None else None
            entry = root / cache_key(fingerprint, tokenizer_fingerprint(tokenizer), template, cfg)
            if (entry / "meta.json").exists():
                try:
                    store = TokenStore(entry, source.path)
                    return Tokenized(store, time.perf_counter() - start, True, str(entry))
                except (OSError, ValueError, KeyError, AssertionError):  # damaged (e.g. a truncated file): redo it
                    shutil.rmtree(entry, ignore_errors=True)
        elif not note:
            note = f"{source.path} has no files to identify it by"
    work = None
    if entry is not None:
        try:
            _remove_stale(root)
            work = root / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            work.mkdir(parents=True)
        except OSError as e:
            work, entry, note = None, None, f"cannot write to {root}: {e}"
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="velotune-tokenized-"))
    try:
        seconds = _write(source, cfg, tokenizer, work, name, progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if entry is None:  # not cached: map the arrays, then remove the files (the mapping keeps their data)
        store = TokenStore(work, source.path)
        shutil.rmtree(work, ignore_errors=True)
        return Tokenized(store, seconds, False, "", note)
    try:
        os.replace(work, entry)
    except OSError:  # another process stored the same entry first: use theirs
        shutil.rmtree(work, ignore_errors=True)
    return Tokenized(TokenStore(entry, source.path), seconds, False, str(entry))
