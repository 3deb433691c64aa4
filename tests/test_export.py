"""Exporting a model dir to object storage (the S3 server on 127.0.0.1): the previous model stays whole and loadable
until the new one is complete, and once it is, no file of the previous one is left."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from ember import storage
from ember.errors import EmberError
from ember.model import load_model, save_model


def _objects(uri: str) -> dict[str, bytes]:
    """Every object under a model prefix, read from the bucket itself (not through a node cache)."""
    return {rel: storage.read_bytes(storage.join(uri, rel)) for rel, _ in storage.list_files(uri)}


def _load_fresh(uri: str, cache, monkeypatch):
    """The model at `uri` through a node cache of its own: what a fresh serving replica would load."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(cache))
    return load_model(uri)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_bucket_export_keeps_the_previous_model_until_the_new_one_is_complete(s3_server, tmp_path, monkeypatch):
    """v1 is exported in shards (an index and several weight files), v2 as one file. An upload of v2 that fails
    midway (its third file) leaves v1's objects exactly as they were, and v1 loads; the export of v2 run again
    publishes v2, and none of v1's files (its index, its shards) is left to be mistaken for part of it."""
    bucket, endpoint, _ = s3_server
    uri = f"s3://{bucket}/export-{tmp_path.name}/model?endpoint_override={endpoint}&scheme=http"
    v1, v2 = tiny_model(64, seed=1), tiny_model(64, seed=2)
    save_model(v1, uri, max_shard_bytes=40_000)
    before = _objects(uri)
    assert "model.safetensors.index.json" in before and len([n for n in before if n.endswith(".safetensors")]) > 1

    uploads, put_file = [], storage.put_file

    def failing_put(local, location):
        uploads.append(location)
        if len(uploads) == 3:
            raise EmberError(f"{storage.display(location)}: connection reset (the export was killed here)")
        put_file(local, location)

    monkeypatch.setattr(storage, "put_file", failing_put)
    with pytest.raises(EmberError, match="connection reset"):
        save_model(v2, uri)
    monkeypatch.setattr(storage, "put_file", put_file)
    assert len(uploads) == 3 and _objects(uri) == before  # v1 untouched, object for object
    assert _same_weights(_load_fresh(uri, tmp_path / "cache-1", monkeypatch), v1)

    save_model(v2, uri)
    assert sorted(_objects(uri)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert _same_weights(_load_fresh(uri, tmp_path / "cache-2", monkeypatch), v2)
    assert storage.list_names(storage.parent(uri)) == {"model"}  # no staging prefix left beside it
