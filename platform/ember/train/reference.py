"""The reference model of a full preference fine-tune, computed once: each pair's log-probabilities of its chosen and
rejected answers under the base, stored with the dataset, and read beside the pairs during training.

DPO and IPO compare the policy with a reference. With LoRA the reference is the base itself with the adapters off
(`ember.train.recipes.PreferenceTuning`); with full fine-tuning it would be a second model in memory for the whole
run. Instead `ensure_reference` scores every pair of both splits in one Ray Data pass before training (actors that
build the base as the trainer does, the same seed, vocabulary and precision, in eval mode) and writes::

    DATA_DIR/reference/KEY/train.arrow   chosen_logps, rejected_logps (float32), one row per pair in file order
    DATA_DIR/reference/KEY/val.arrow
    DATA_DIR/reference/KEY/reference.json   the stamp, written last: what KEY is (dataset, base weights, model, dtype)

KEY follows from what the figures depend on, so a rerun or a resumed run reuses them and another base gets its own.
`with_reference` serves a split's batches with the figures of each pair added (`ember.train.recipes.REFERENCE_COLUMNS`).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pyarrow as pa

from ember import storage
from ember.data.shards import SPLITS, ShardReader, rank_batches
from ember.errors import EmberError
from ember.identity import identity_of, read_stamp, write_stamp
from ember.train.recipes import REFERENCE_COLUMNS
from ember.train.run import RunPlan

log = logging.getLogger("ember")

STAMP = "reference.json"


def reference_key(plan: RunPlan) -> str:
    """What the reference figures of a run depend on: the pairs, the base's weights, the network (its vocabulary
    grown as the run's: new token rows are the mean of the others) and the precision."""
    return identity_of({"dataset": plan.manifest["identity"], "base_weights": plan.base_weights,
                        "model": plan.model.to_dict(), "precision": plan.spec.deepspeed.precision})


def reference_dir(plan: RunPlan) -> str:
    return storage.join(plan.data_dir, "reference", reference_key(plan)[:16])


class _Scorer:
    """A Ray Data actor: the base, built as the run's trainer builds it, scoring pairs by their row index."""

    def __init__(self, config: dict, split: str):
        import torch

        from ember.runtime import quiet_libraries
        from ember.train.recipes import recipe_of, use_tf32

        quiet_libraries()
        use_tf32()  # the matmuls of the trainer's policy, which must equal this at step 0
        plan = RunPlan.from_config(config)
        self.device = "cuda" if plan.spec.scaling.use_gpu and torch.cuda.is_available() else "cpu"
        self.model = recipe_of(plan.spec).build(plan, self.device)[0].eval()
        self.reader = ShardReader(plan.data_dir, split)

    def __call__(self, batch: dict) -> dict:
        import torch

        from ember.train.preference_loss import pair_logps

        rows = [self.reader.columns(int(i)) for i in batch["id"]]
        tensors = {c: torch.from_numpy(np.stack([r[c] for r in rows]).astype(np.int64)).to(self.device)
                   for c in rows[0]}
        with torch.no_grad():
            logps = pair_logps(self.model, tensors)
        return {"id": batch["id"], "chosen": logps["chosen_logps"].float().cpu().numpy(),
                "rejected": logps["rejected_logps"].float().cpu().numpy()}


def _score_split(plan: RunPlan, split: str) -> pa.Table:
    """Every pair of a split scored on Ray Data: a table of chosen_logps, rejected_logps in row order."""
    import ray.data

    rows, s = int(plan.manifest["splits"][split]["rows"]), plan.spec.scaling
    batch = plan.spec.train.micro_batch_size
    # The row indices from the driver (no read task: the actors may hold every CPU of a small cluster).
    indices = ray.data.from_items([{"id": i} for i in range(rows)], override_num_blocks=max(1, -(-rows // batch)))
    scored = indices.map_batches(
        _Scorer, fn_constructor_args=(plan.to_config(), split), batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=min(s.workers, max(1, -(-rows // batch)))),
        num_cpus=s.cpus_per_worker, num_gpus=1 if s.use_gpu else 0, resources=s.resources_per_worker or None)
    chosen, rejected = np.full(rows, np.nan, np.float32), np.full(rows, np.nan, np.float32)
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        chosen[batch["id"]], rejected[batch["id"]] = batch["chosen"], batch["rejected"]
    if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
        raise EmberError(f"the reference pass gave pairs of {split}/ no finite figure (the base's log-probabilities "
                         "overflowed, or a row went unscored): check the base in this precision")
    return pa.table({"chosen_logps": chosen, "rejected_logps": rejected})


def ensure_reference(plan: RunPlan, address: str | None = None) -> str:
    """The reference figures of a full preference fine-tune, computed on Ray (or found from an earlier run of the
    same pairs and base); returns their directory."""
    from ember.runtime import ensure_ray

    out, key = reference_dir(plan), reference_key(plan)
    stamp = read_stamp(storage.join(out, STAMP))
    if stamp is not None and stamp["identity"] == key:
        log.info("preference: reference log-probabilities found in %s", storage.display(out))
        return out
    ensure_ray(address)
    t0 = time.perf_counter()
    for split in SPLITS:
        if not plan.manifest["splits"][split]["rows"]:
            continue
        sink = io.BytesIO()
        table = _score_split(plan, split)
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        storage.write_bytes(storage.join(out, f"{split}.arrow"), sink.getvalue())
    write_stamp(storage.join(out, STAMP), key, base=storage.display(plan.spec.base))
    pairs = sum(int(plan.manifest["splits"][s]["rows"]) for s in SPLITS)
    log.info("preference: reference log-probabilities of %d pairs computed in %.1fs (%s)", pairs,
             time.perf_counter() - t0, storage.display(out))
    return out


class ReferencedReader:
    """A split's reader whose samples carry their pair's reference figures (the same order, slices and resume)."""

    def __init__(self, reader: ShardReader, values: dict[str, np.ndarray]):
        self.reader, self.values = reader, values

    def __len__(self) -> int:
        return len(self.reader)

    def _sample(self, k: int) -> dict:
        row = self.reader.sample_row(k)
        return {**self.reader.columns(row), **{name: v[row] for name, v in self.values.items()}}

    def batches(self, batch_size: int, start: int = 0):
        return rank_batches(self._sample, batch_size, start, self.reader.rank, self.reader.world_size)

    def close(self) -> None:
        self.reader.close()


def with_reference(reader: ShardReader | None, directory: str, split: str) -> ReferencedReader | None:
    """`reader` with the reference figures in `directory` (`ensure_reference`) added to its samples."""
    if reader is None:
        return None
    location = storage.join(directory, f"{split}.arrow")
    table = pa.ipc.open_file(pa.BufferReader(storage.read_bytes(location))).read_all()
    if table.num_rows != len(reader):
        raise EmberError(f"{storage.display(location)} holds {table.num_rows} reference figures for the "
                         f"{len(reader)} pairs of {split}/: delete {storage.display(directory)} to compute them again")
    chosen, rejected = REFERENCE_COLUMNS
    return ReferencedReader(reader, {chosen: table.column("chosen_logps").to_numpy(),
                                     rejected: table.column("rejected_logps").to_numpy()})
