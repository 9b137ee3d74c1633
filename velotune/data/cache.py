"""Where tokenized data is cached, and the key that says when a cached copy still holds.

The key covers everything tokenizing depends on: the data (its content, not its name), the tokenizer (vocabulary,
merges, added tokens, normalisation: its serialised Rust backend; special tokens), the chat template actually used,
each DataConfig setting that changes the tokens, and DATA_FORMAT_VERSION, bumped whenever velotune's output for
the same inputs changes. eval_split and seed are not in it: the split is drawn from the cached rows.
"""

import hashlib
import json
import os
from pathlib import Path

from velotune import env
from velotune.data.config import DataConfig

DATA_FORMAT_VERSION = 1
_BLOCK = 1 << 22


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $VELOTUNE_CACHE/tokenized, else ~/.cache/velotune/tokenized."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    return env.cache_home() / "tokenized"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_fingerprint(path: str, root: Path) -> str:
    """Hash of a file's bytes, remembered under `root` by (real path, size, inode, mtime, ctime) so a file is read
    once; ctime changes on every write and cannot be set back, so a rewritten file is always hashed again."""
    st = os.stat(path)
    stamp = f"{os.path.realpath(path)}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    memo = root / "fingerprints" / _digest(stamp)
    try:
        return memo.read_text(encoding="ascii").strip()
    except OSError:
        pass
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    value = f"{st.st_size}-{h.hexdigest()}"
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(value, encoding="ascii")
        os.replace(tmp, memo)
    except OSError:  # an unwritable cache costs a re-read next time, nothing more
        pass
    return value


def files_fingerprint(paths: list[str]) -> str:
    """Identity of files that are never rewritten in place (Arrow files of a saved dataset): names, sizes, mtimes."""
    parts = []
    for p in sorted(paths):
        st = os.stat(p)
        parts.append(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}")
    return _digest("\n".join(parts))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what makes a tokenizer produce the ids it does (and the chat template it carries)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "class": type(tokenizer).__name__,
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return _digest(body + json.dumps(extra, sort_keys=True, default=str))


def cache_key(source_fingerprint: str, tokenizer_fp: str, chat_template: str | None, cfg: DataConfig) -> str:
    """The name of the cache entry for one data source tokenized under `cfg`."""
    inputs = {
        "version": DATA_FORMAT_VERSION,
        "source": source_fingerprint,
        "tokenizer": tokenizer_fp,
        "chat_template": chat_template,
        "format": cfg.format,
        "max_seq_length": cfg.max_seq_length,
        "train_on": cfg.train_on,
        "too_long": cfg.too_long,
        "template": cfg.template,
        "system_prompt": cfg.system_prompt,
        "field_map": sorted(cfg.field_map.items()),
    }
    return _digest(json.dumps(inputs, sort_keys=True))[:32]
