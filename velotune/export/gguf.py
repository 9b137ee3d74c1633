"""GGUF export written by velotune: a Hugging Face model directory in, one .gguf file out, no llama.cpp build.

Exporting through llama.cpp means building it (minutes, a compiler, version drift) and running two tools with a
full-size F16 file in between. We write the file directly with gguf-py's GGUFWriter: names from its TensorNameMap,
metadata from `gguf_arch`, tokenizer from `gguf_vocab`, per-tensor types from `gguf_quants.mix` and bytes from
`gguf_quants` (gguf-py's quantizers where it has them, our numpy k-quants where it only reads).

Flow: plan every tensor (GGUF name, shape, type), check free disk space against the planned size, write the header,
metadata and tensor index with GGUFWriter, then fill the data section: every tensor's offset is known from the plan,
so row pieces of about 8M weights are read from memory-mapped safetensors, converted and written straight to their
place in the file, by a pool of worker processes for large models (no results pass through the parent). The file is
written under a temporary name beside `out_path` and renamed only once complete, so a failed export never leaves a
truncated .gguf behind.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import struct
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from tqdm import tqdm

from velotune.errors import ExportError, ModelLoadError
from velotune.export.gguf_arch import (
    ArchSpec,
    HParams,
    add_hparams,
    arch_spec,
    permute_qk,
    read_hparams,
    rope_tensors,
)
from velotune.export.gguf_quants import QUANTIZERS
from velotune.export.gguf_quants.mix import EXPORT_TYPES, ModelShape, tensor_type
from velotune.export.gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

QUANT_TYPES: tuple[str, ...] = tuple(EXPORT_TYPES)
PIECE_ELEMENTS = 1 << 23  # values per unit of work (32 MiB as float32): small enough to balance, big enough to pay
POOL_MIN_ELEMENTS = 1 << 26  # k-quant work below ~64M weights (8x that for float types) is done in-process

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_F16_MAX = 65504.0


@dataclass(frozen=True)
class _Source:
    """One tensor inside a safetensors file."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its data in the file


@dataclass(frozen=True)
class _Tensor:
    """One planned GGUF tensor."""

    name: str
    shape: tuple[int, ...]  # numpy order, rows last
    qtype: GGMLQuantizationType
    source: _Source | None
    data: np.ndarray | None = None  # generated tensors (rope_freqs) carry their values
    head_rows: int = 0  # > 0: q/k rows are permuted per head of this many rows (llama.cpp's rotary order)
    add: float = 0.0  # added to every value (Gemma norms: llama.cpp stores 1 + w)


@dataclass(frozen=True)
class _Piece:
    """Rows [row0, row1) of a planned tensor and where their bytes go: the unit of work handed to a worker."""

    tensor: _Tensor
    row0: int
    row1: int
    path: str = ""  # the output file
    offset: int = 0  # absolute byte offset of these rows in it


def _safetensors_sources(model_dir: Path) -> dict[str, _Source]:
    """Every tensor of the checkpoint (single file or sharded with an index), by Hugging Face name. A missing shard,
    an index or header that is not JSON, a truncated file: one ModelLoadError naming the file (models/load.py's
    checks, the ones loading uses)."""
    from velotune.models.load import open_safetensors, safetensors_files

    if not (model_dir / "model.safetensors.index.json").is_file() and not list(model_dir.glob("*.safetensors")):
        raise ModelLoadError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json; GGUF export reads safetensors "
            "checkpoints, so save the model with save_pretrained(..., safe_serialization=True) first"
        )
    sources: dict[str, _Source] = {}
    for path in safetensors_files(model_dir):
        with open_safetensors(path):  # validates the header and that the data covers it
            pass
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ExportError(
                    f"{path}: tensor {name} is {info['dtype']}; GGUF export reads F32/F16/BF16 weights, so merge "
                    "adapters and save the model unquantized (bf16) before exporting"
                )
            start = 8 + n + info["data_offsets"][0]
            sources[name] = _Source(str(path), name, info["dtype"], tuple(info["shape"]), start)
    return sources


def _read_rows(src: _Source, row0: int, row1: int) -> np.ndarray:
    """Rows [row0, row1) of a safetensors tensor as float32, memory-mapped. (row1 - row0, *shape[1:])."""
    row_elems = int(np.prod(src.shape[1:], dtype=np.int64))
    dtype = np.dtype(_ST_DTYPES[src.dtype])
    count = (row1 - row0) * row_elems
    mm = np.memmap(src.path, dtype=dtype, mode="r", offset=src.offset + row0 * row_elems * dtype.itemsize, shape=count)
    if src.dtype == "BF16":
        x = (mm.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of a float32
    else:
        x = mm.astype(np.float32)
    return x.reshape(row1 - row0, *src.shape[1:])


def _quantize_piece(piece: _Piece) -> np.ndarray:
    """The bytes of one piece in its tensor's GGML type."""
    t = piece.tensor
    x = t.data[piece.row0 : piece.row1] if t.data is not None else _read_rows(t.source, piece.row0, piece.row1)
    if t.head_rows:
        x = permute_qk(x, n_head=x.shape[0] // t.head_rows)
    if t.add:
        x = x + np.float32(t.add)
    where = f"{t.source.name} in {t.source.path}" if t.source else t.name
    if not np.isfinite(x).all():
        raise ExportError(f"{where}: NaN or Inf values; the weights are broken (diverged training or a bad merge)")
    if t.qtype == GGMLQuantizationType.F16 and x.size and np.abs(x).max() > _F16_MAX:
        raise ExportError(f"{where}: values beyond float16's range ({_F16_MAX:g}); export with quant='bf16'")
    return QUANTIZERS[t.qtype].quantize(x if x.ndim > 1 else x.reshape(1, -1)).reshape(-1).view(np.uint8)


def _write_piece(piece: _Piece) -> int:
    """Convert one piece and write it at its offset in the output file (runs in worker processes)."""
    data = _quantize_piece(piece)
    with open(piece.path, "r+b") as f:
        f.seek(piece.offset)
        f.write(memoryview(data))
    return _source_bytes(piece)


def _layer_order(name: str) -> tuple[int, int, str]:
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _map_names(sources: dict[str, _Source], spec: ArchSpec, hp: HParams) -> dict[str, _Source]:
    """GGUF name -> source tensor, dropping what llama.cpp does not store; ExportError on unknown or missing names."""
    tmap = get_tensor_name_map(spec.arch, hp.n_layer)
    named: dict[str, _Source] = {}
    for hf_name, src in sources.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and hp.tie_embeddings):
            continue
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None or gname in named:
            what = "no GGUF name" if gname is None else f"a second tensor for {gname}"
            raise ExportError(
                f"{src.path}: tensor {hf_name} has {what} in the {spec.name} table; is config.json's model_type "
                "right for these weights?"
            )
        if len(src.shape) > 2:
            raise ExportError(f"{src.path}: tensor {hf_name} has shape {src.shape}; GGUF export handles 1-D/2-D")
        named[gname] = src
    per_layer = [{n.split(".", 2)[2] for n in named if n.startswith(f"blk.{i}.")} for i in range(hp.n_layer)]
    expected = set().union(*per_layer)
    missing = [f"blk.{i}.{s}" for i, have in enumerate(per_layer) for s in sorted(expected - have)]
    if "token_embd.weight" not in named:
        missing.insert(0, "token_embd.weight (model.embed_tokens.weight)")
    if missing:
        raise ExportError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}; re-save the model")
    rows = named["token_embd.weight"].shape[0]
    if rows != hp.vocab_size:
        raise ExportError(f"embedding has {rows} rows but config.json vocab_size is {hp.vocab_size}; make them agree")
    return named


def _plan(model_dir: Path, spec: ArchSpec, hp: HParams, quant: str) -> list[_Tensor]:
    """Every tensor of the output file, in write order, with its GGML type."""
    named = _map_names(_safetensors_sources(model_dir), spec, hp)
    shape = ModelShape(hp.n_layer, "output.weight" in named, is_70b=hp.n_layer == 80 and hp.n_head_kv < hp.n_head)
    tensors = []
    for gname, values in rope_tensors(spec, hp).items():
        tensors.append(_Tensor(gname, values.shape, GGMLQuantizationType.F32, None, values))
    for gname in sorted(named, key=_layer_order):
        src = named[gname]
        head_rows = 0
        if spec.permute_qk and (".attn_q." in gname or ".attn_k." in gname):
            n_head = hp.n_head if ".attn_q." in gname else hp.n_head_kv
            if src.shape[0] != n_head * hp.head_dim:
                raise ExportError(
                    f"{src.name}: {src.shape[0]} rows, expected heads x head_dim = {n_head} x {hp.head_dim} from "
                    "config.json; fix num_attention_heads / num_key_value_heads / head_dim"
                )
            head_rows = hp.head_dim
        add = spec.norm_offset if gname.endswith("norm.weight") else 0.0
        qtype = tensor_type(gname, src.shape, quant, shape)
        tensors.append(_Tensor(gname, src.shape, qtype, src, None, head_rows, add))
    return tensors


def _pieces(t: _Tensor, path: str, offset: int) -> list[_Piece]:
    """Row ranges of about PIECE_ELEMENTS values (whole heads for permuted tensors), placed from `offset` on."""
    rows = t.shape[0] if t.shape else 1
    if len(t.shape) < 2:
        return [_Piece(t, 0, rows, path, offset)]
    align = t.head_rows or 1
    step = max(align, PIECE_ELEMENTS // t.shape[1] // align * align)
    row_bytes = QUANTIZERS[t.qtype].nbytes(t.shape[1:])
    return [_Piece(t, r, min(r + step, rows), path, offset + r * row_bytes) for r in range(0, rows, step)]


def _run(pieces: list[_Piece], workers: int) -> Iterator[int]:
    """_write_piece over `pieces`, yielding source bytes done; with workers > 1 in a pool of spawned processes."""
    if workers <= 1:
        yield from map(_write_piece, pieces)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_write_piece, p) for p in pieces]
        try:
            for f in as_completed(futures):
                yield f.result()
        finally:
            for f in futures:
                f.cancel()


def _source_bytes(piece: _Piece) -> int:
    t = piece.tensor
    itemsize = np.dtype(_ST_DTYPES[t.source.dtype]).itemsize if t.source else 4
    return (piece.row1 - piece.row0) * int(np.prod(t.shape[1:], dtype=np.int64)) * itemsize


def _padded(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _check_disk(out: Path, model_dir: Path, tensors: list[_Tensor]) -> None:
    """ExportError when the target filesystem cannot hold the planned file (tensors + metadata + padding)."""
    need = sum(_padded(QUANTIZERS[t.qtype].nbytes(t.shape), GGUF_DEFAULT_ALIGNMENT) for t in tensors)
    tok = model_dir / "tokenizer.json"
    need += (tok.stat().st_size if tok.is_file() else 0) + 64 * len(tensors) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise ExportError(
            f"not enough disk space in {out.parent}: the GGUF needs about {need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; free some space or choose another out_path"
        )


def _default_workers(tensors: list[_Tensor], quant: str) -> int:
    """All cores when the conversion outweighs starting worker processes (~2 s each), else 1 (in-process)."""
    total = sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors)
    if total < (POOL_MIN_ELEMENTS if EXPORT_TYPES[quant].k_mix else 8 * POOL_MIN_ELEMENTS):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write(
    path: Path,
    model_dir: Path,
    spec: ArchSpec,
    hp: HParams,
    quant: str,
    tensors: list[_Tensor],
    progress: bool,
    workers: int,
) -> None:
    """Metadata, tensor index and data of the GGUF file at `path`."""
    writer = GGUFWriter(path, spec.name)
    writer.add_type("model")
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(int(EXPORT_TYPES[quant].file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    add_hparams(writer, spec, hp)
    add_tokenizer(writer, model_dir, hp.vocab_size)
    for t in tensors:
        nbytes = QUANTIZERS[t.qtype].nbytes(t.shape)
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    # GGUF data section: starts aligned after the tensor index, each tensor at its aligned offset (as GGUFWriter
    # numbered them above), padded with zeros. Size the file now; workers fill their pieces in place.
    align = writer.data_alignment
    offset = _padded(path.stat().st_size, align)
    pieces = []
    for t in tensors:
        pieces += _pieces(t, str(path), offset)
        offset += _padded(QUANTIZERS[t.qtype].nbytes(t.shape), align)
    with open(path, "r+b") as f:
        f.truncate(offset)
    total = sum(map(_source_bytes, pieces))
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"GGUF {quant}", disable=not progress
    ) as bar:
        for done in _run(pieces, workers):
            bar.update(done)


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    quant: str = "f16",
    *,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the Hugging Face model in `model_dir` as a single GGUF file at `out_path`; returns its path.

    `quant` is one of QUANT_TYPES: f16, bf16, q8_0, or the llama.cpp mixes q4_k_m, q5_k_m, q6_k. `workers`
    processes convert in parallel (default: all cores for k-quant exports over ~64M weights or float exports over
    ~512M, else in-process); scripts that use more than one must call this under `if __name__ == "__main__":`,
    as worker processes are spawned.
    """
    key = quant.lower()
    if key not in EXPORT_TYPES:
        raise ExportError(f"unknown GGUF quant {quant!r}; valid: {', '.join(QUANT_TYPES)}")
    model_dir, out = Path(model_dir), Path(out_path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json; pass a directory written by save_pretrained")
    if out.is_dir():
        raise ExportError(f"out_path {out} is a directory; give a file name such as {out / (model_dir.name + '.gguf')}")
    cfg = json.loads(config_path.read_text())
    spec = arch_spec(str(cfg.get("model_type")))
    hp = read_hparams(cfg, str(config_path))
    tensors = _plan(model_dir, spec, hp, key)
    log.info("GGUF %s types: %s", key, dict(Counter(t.qtype.name for t in tensors)))
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out, model_dir, tensors)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        _write(tmp, model_dir, spec, hp, key, tensors, progress, workers or _default_workers(tensors, key))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
