"""A GGUF file's config and tokenizer, read once through Transformers' GGUF reader and kept as a plain folder
(config.json and the tokenizer's files) in the cache folder: Transformers parses the file's whole metadata, the
vocabulary's strings included, for each of the two, seconds each, which every start would pay again.

The folder's name changes with the file (its size and first and last MiB) and with Transformers' major version;
it is written aside and renamed into place, so a crash never leaves half a folder and racing processes each see a
whole one."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hfbridge.paths import cache_root

logger = logging.getLogger(__name__)


def gguf_metadata_folder(path: Path) -> Path:
    """A folder with `path`'s config.json and, where the file has one, its tokenizer."""
    folder = cache_root() / "gguf" / cache_key(path)
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        write_atomically(folder, lambda out: save_metadata(path, out))
        logger.info("%s: config and tokenizer read once (%.1f s), kept in %s", path.name,
                    time.perf_counter() - start, folder)
    return folder


def save_metadata(path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a GGUF without a tokenizer: the user passes one
        logger.info("%s has no tokenizer Transformers can read (%s); pass --tokenizer", path.name, e)
        return
    tokenizer.save_pretrained(out)


def cache_key(path: Path) -> str:
    """Hashing a multi-GB file on every start is wasted time: its size and first and last MiB identify it."""
    import transformers

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    major = transformers.__version__.split(".")[0]
    return f"{path.stem.lower()}-{size}-{digest.hexdigest()[:12]}-tf{major}"


def write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary sibling folder, which is then renamed to `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(folder: Path, max_age_s: float = 3600) -> None:
    """Temporary folders of writes that were killed (Ctrl-C, OOM); fresh ones may be another process's."""
    for tmp in folder.parent.glob(f".{folder.name}.*"):
        try:
            if time.time() - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
