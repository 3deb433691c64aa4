"""The generation engine inside each replica: one KV cache, continuous batching, chunked prefill.

A background thread runs the step loop. Each step it
1. admits waiting requests into free rows of the batch (up to `max_batch_size` rows and `max_tokens_in_flight`
   prompt + output tokens);
2. runs one forward pass over the decoding rows (each feeds its last token) and one over rows still reading their
   prompt (each feeds its next `prefill_chunk` prompt tokens, up to `prefill_tokens_per_step` in all), so a long
   prompt or a burst of new ones is read over several steps while the others keep decoding;
3. samples the next token of every row that has read its whole prompt, with that request's own sampling parameters
   and seed (rows of the same parameters in one pass, each drawing from its own generator), and hands the step's
   tokens to their consumers in one call per event loop. A row whose logits are not finite or whose sampling fails
   ends alone with an error event, and the other rows' tokens are exactly what they would be without it;
4. drops finished or cancelled rows at once, moving the last active row into the freed one so active rows are
   always the first rows of the cache (the forward pass then runs over exactly the active rows).

The queue in front is bounded (`max_queue`): `submit` takes all the choices of one client request or none of them,
raising `Overloaded` when they do not fit, never queueing without limit. A step whose forward pass fails ends its
rows with an error, and so does a step in which every row's logits are non-finite; after `max_failed_steps` such
steps in a row the engine reports itself unhealthy, so Ray Serve replaces the replica. Consumers read tokens from
`Request.events()`, an asyncio iterator fed from the engine thread.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ember.model.llama import KVCache, Transformer
from ember.model.sampling import SamplingParams, make_generator, next_tokens, padded_history
from ember.serve.kv import PrefixCache, RowCache, block_hashes

log = logging.getLogger("ember")

NON_FINITE = "the model produced non-finite logits for this request"
UNSAMPLEABLE = "sampling failed (probabilities not finite after the request's sampling parameters)"


def release_openmp_threads() -> None:
    """Frees the calling thread's OpenMP worker threads (`omp_pause_resource_all`, OpenMP 5.0; libgomp, which torch
    ships, frees the caller's pool), if the runtime has the call. Why: the thread that built the model keeps its
    pool, and while it exists the engine thread's pool is one too many for the cores, so libgomp stops spinning and
    each of the step's parallel regions waits for its workers to wake: a 32-row decoding step measured 2-3x slower.
    The pool comes back the next time this thread runs a parallel torch op."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):
        return
    pause(1)  # omp_pause_soft


class Overloaded(Exception):
    """The engine's queue is full; the caller should answer 503 and the client retry later."""


@dataclass
class TokenEvent:
    token: int | None  # None: the request has finished
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # with the last event: "stop", "length", "error" or "abort"
    error: str | None = None  # what failed, with finish_reason "error"


@dataclass(frozen=True)
class StepRecord:
    """What one step ran, handed to `on_step`: for the metrics, and for tests that observe the batching."""

    decoded: tuple[int, ...]  # ids of the requests that fed their last token and got their next one
    prefilled: tuple[tuple[int, int], ...]  # (request id, prompt tokens fed) of the requests reading their prompt
    queued: int  # requests still waiting for a row
    kv_cache_bytes: int = 0  # what the rows' KV cache holds (see ember.serve.kv)
    prefix_hit_rate: float | None = None  # the prefix cache's, since the start (None: no prefix caching)

    @property
    def rows(self) -> int:
        return len(self.decoded) + len(self.prefilled)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    logprobs: int | None = None  # top-k log probabilities per token (0 = only the chosen token's)
    cache_salt: str | None = None  # shares prefix-cache blocks only with requests of the same salt
    id: int = field(default_factory=itertools.count().__next__)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    _loop: asyncio.AbstractEventLoop | None = None
    _queue: asyncio.Queue | None = None
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of the model
    _read: int = 0  # prompt tokens fed to the model so far (or read from the prefix cache)
    _generator: torch.Generator | None = None
    _names: list[bytes] = field(default_factory=list)  # the prompt's full blocks (see ember.serve.kv)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._queue = loop, asyncio.Queue()

    def _emit(self, event: TokenEvent) -> None:
        deliver([(self, event)])

    async def events(self):
        """Token events until the last one (token None with its finish_reason)."""
        while True:
            event = await self._queue.get()
            yield event
            if event.token is None:
                return


def deliver(events: list[tuple[Request, TokenEvent]]) -> None:
    """Hands a step's events to their consumers in order: one call into each event loop per step, not one per token
    (each call wakes the loop through its self-pipe)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for r, event in events:
        if r._loop is not None:
            by_loop.setdefault(r._loop, []).append((r._queue, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop closed: its consumers are gone
            pass


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class Engine:
    """`kv_cache_bytes` bounds the rows' KV memory (default: every row at the context); `prefix_cache_tokens` > 0
    keeps that many tokens of prompt prefixes for later requests (see `ember.serve.kv`)."""

    def __init__(self, model: Transformer, *, max_batch_size: int = 16, max_tokens_in_flight: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 128, prefill_tokens_per_step: int = 512,
                 max_model_len: int | None = None, max_failed_steps: int = 3, on_step=None,
                 kv_cache_bytes: int | None = None, prefix_cache_tokens: int = 0, block_size: int = 16):
        self.model = model.eval()
        self.cfg = model.config
        self.context = min(max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight or max_batch_size * self.context
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens_per_step = max(prefill_tokens_per_step, prefill_chunk)
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        # Slack after the context: padding positions of a short row in a step with a prefill chunk land there.
        self.rows = RowCache(self.cfg, max_batch_size, self.context + prefill_chunk, kv_cache_bytes, dtype,
                             self.device)
        self.prefix = PrefixCache(prefix_cache_tokens, block_size) if prefix_cache_tokens else None
        self._pending: dict[bytes, Request] = {}  # blocks that rows reading their prompt will store
        self.active: list[Request] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.on_step = on_step  # called with each step's StepRecord (metrics, tests)
        self.steps = 0
        self.threads = torch.get_num_threads()  # the engine thread's torch threads: the constructing thread's
        release_openmp_threads()
        self.max_failed_steps = max_failed_steps
        self.failed_steps = 0  # consecutive steps whose forward pass failed or whose every row's logits were not finite
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    @property
    def cache(self) -> KVCache | None:
        """The running rows' keys and values (None while idle)."""
        return self.rows.cache

    def submit(self, *requests: Request) -> None:
        """Queues the choices of one client request, all or none (each prompt must fit the context; the caller
        checks); raises Overloaded when they do not fit in the free rows and the queue's room."""
        generators = [make_generator(r.params.seed, self.device) for r in requests]  # may raise: nothing queued yet
        if self.prefix is not None:
            for r in requests:
                r._names = block_hashes(r.prompt, self.prefix.block_size, salt=r.cache_salt)
        with self.lock:
            room = self.max_queue + self.max_batch_size - len(self.active) - len(self.waiting)
            if len(requests) > room:
                raise Overloaded(f"the server is at capacity ({len(self.active)} running, {len(self.waiting)} "
                                 f"queued, room for {max(room, 0)} more); retry later")
            for r, g in zip(requests, generators):
                r._generator = g
                self.waiting.append(r)
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """Frees the request's row at the next step (a client went away)."""
        with self.lock:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
            self.lock.notify()

    def stats(self) -> dict:
        with self.lock:
            out = {"running": len(self.active), "queued": len(self.waiting), "steps": self.steps,
                   "kv_cache_bytes": self.rows.bytes, "kv_cache_budget_bytes": self.rows.budget}
            if self.prefix is not None:
                out.update(prefix_cache_hit_rate=round(self.prefix.hit_rate, 4),
                           prefix_cache_tokens=self.prefix.tokens)
            return out

    def shutdown(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify()
        self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        """The step loop runs and fewer than `max_failed_steps` steps in a row have failed."""
        return self._thread.is_alive() and self.failed_steps < self.max_failed_steps

    # ------------------------------------------------------------------ the loop

    def _budget(self, r: Request) -> int:
        return min(len(r.prompt) + r.params.max_new_tokens, self.context)

    def _length(self, r: Request) -> int:
        """The positions r's row can reach: its budget, and a prompt chunk's padding while it reads its prompt."""
        return max(self._budget(r), len(r.prompt) + self.prefill_chunk)

    def _admit(self) -> None:
        """Waiting requests into rows, in order, while the rows, the tokens in flight and the KV memory allow; a
        request whose next prompt block a running row is computing waits for it in the prefix cache."""
        in_flight = sum(self._budget(r) for r in self.active)
        length = max((self._length(r) for r in self.active), default=0)
        deferred = []
        while self.waiting and len(self.active) < self.max_batch_size:
            nxt = self.waiting[0]
            if self.active and in_flight + self._budget(nxt) > self.max_tokens_in_flight:
                break
            grown = max(length, self._length(nxt))
            if not self.rows.fits(len(self.active) + 1, grown):
                if not self.active:  # alone it can never run: the caller's limits should have refused it
                    self.waiting.popleft()
                    nxt._emit(TokenEvent(None, finish_reason="error", error="the request does not fit the "
                                         "KV cache's memory budget"))
                    continue
                break  # waits for memory
            self.waiting.popleft()
            reused = self.prefix.match(nxt._names) if self.prefix is not None else 0
            if reused < self._reusable(nxt) and nxt._names[reused] in self._pending:
                deferred.append(nxt)
                continue
            row = len(self.active)
            self.rows.ensure(row + 1, grown, row)
            self.cache.lengths[row] = 0
            if self.prefix is not None:
                self._start_from_prefix(nxt, row, reused)
            self.active.append(nxt)
            in_flight, length = in_flight + self._budget(nxt), grown
        self.waiting.extendleft(reversed(deferred))

    def _reusable(self, r: Request) -> int:
        """Blocks of r's prompt that can come from the prefix cache: those before its last token, which the model
        must read to give the first new token's logits."""
        return (len(r.prompt) - 1) // self.prefix.block_size if self.prefix is not None else 0

    def _start_from_prefix(self, r: Request, row: int, blocks: int) -> None:
        """r's row from its cached prompt blocks; the blocks it will compute are marked pending for the others."""
        blocks = min(blocks, self._reusable(r))
        tokens = blocks * self.prefix.block_size
        if tokens:
            self.prefix.copy_into(self.cache, row, r._names[:blocks], tokens)
            self.cache.lengths[row] = tokens
        r._read = r.cached_tokens = tokens
        self.prefix.queried += len(r.prompt)
        self.prefix.hit += tokens
        for name in r._names[blocks:]:
            self._pending.setdefault(name, r)

    def _store_prefix(self, r: Request, row: int, answer: bool) -> None:
        """Keeps the full blocks `row` holds of r's prompt (and, with `answer`, of its answer so far), and clears r's
        pending marks. The prompt's block names are those computed at submit."""
        names = r._names
        if answer:
            held = int(self.cache.lengths[row])  # the tokens fed (the last one sampled has no keys yet)
            names = block_hashes((r.prompt + r.output)[:held], self.prefix.block_size, names, r.cache_salt)
        self.prefix.store(self.cache, row, names)
        self._unmark(r)

    def _unmark(self, r: Request) -> None:
        for name in r._names:
            if self._pending.get(name) is r:
                del self._pending[name]

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self.lock:
                while not self._stop and not self.waiting and not self.active:
                    self.lock.wait()
                if self._stop:
                    for r in list(self.active) + list(self.waiting):
                        r._emit(TokenEvent(None, finish_reason="abort"))
                    return
                self._drop([r for r in self.active if r.cancelled])
                self._admit()
                self._partition()
                batch = list(self.active)
                queued = len(self.waiting)
            record = StepRecord((), (), queued)
            if batch:
                try:
                    record = self._step(batch, queued)
                except Exception as exc:  # a failed step must not leave clients waiting forever
                    self.failed_steps += 1
                    log.exception("engine step failed (%d in a row); its %d requests end with an error",
                                  self.failed_steps, len(batch))
                    with self.lock:
                        self._drop(batch)
                    for r in batch:
                        r._emit(TokenEvent(None, finish_reason="error", error=f"generation failed ({exc})"))
                    continue
            if self.on_step is not None:
                self.on_step(record)

    def _swap(self, i: int, j: int) -> None:
        """Exchanges two rows of the batch, their cached keys and values included."""
        n = int(max(self.cache.lengths[i], self.cache.lengths[j]))
        for t in (self.cache.k, self.cache.v):
            t[:, [i, j], :, :n] = t[:, [j, i], :, :n]
        self.cache.lengths[[i, j]] = self.cache.lengths[[j, i]]
        self.active[i], self.active[j] = self.active[j], self.active[i]

    def _partition(self) -> None:
        """Decoding rows first, rows still reading their prompt last, so each kind runs as one forward pass of its
        own width (a decoding row is never padded to a prompt chunk's width)."""
        lo, hi = 0, len(self.active) - 1
        while lo < hi:
            if self.active[lo]._read >= len(self.active[lo].prompt):
                lo += 1
            elif self.active[hi]._read < len(self.active[hi].prompt):
                hi -= 1
            else:
                self._swap(lo, hi)

    def _drop(self, gone: list[Request]) -> None:
        """Removes rows, moving the last active rows into the holes (caller holds the lock)."""
        for r in gone:
            if r not in self.active:
                continue
            self._unmark(r)
            i, last = self.active.index(r), len(self.active) - 1
            if i != last:
                n = int(self.cache.lengths[last])
                self.cache.k[:, i, :, :n] = self.cache.k[:, last, :, :n]
                self.cache.v[:, i, :, :n] = self.cache.v[:, last, :, :n]
                self.cache.lengths[i] = n
                self.active[i] = self.active[last]
            self.active.pop()
        if not self.active and not self.waiting:
            self.rows.release()  # idle: no KV memory held (before the last client sees its end)

    @torch.inference_mode()
    def _step(self, batch: list[Request], queued: int) -> StepRecord:
        """One step. A step in which every row that was to get a token has non-finite logits (the model, not a
        request, is at fault) counts towards `max_failed_steps` like a failed forward pass."""
        batch, feeds, logits = self._forward(batch)
        self.steps += 1
        reading = [r._read < len(r.prompt) for r in batch]
        record = StepRecord(tuple(r.id for r, p in zip(batch, reading) if not p),
                            tuple((r.id, len(f)) for r, f, p in zip(batch, feeds, reading) if p), queued,
                            self.rows.bytes, self.prefix.hit_rate if self.prefix is not None else None)
        finished, events = [], []
        now = time.perf_counter()
        ready, read = [], []
        for i, r in enumerate(batch):
            if r._read < len(r.prompt):
                r._read += len(feeds[i])
                if r._read < len(r.prompt):
                    continue  # still reading its prompt
                read.append(i)
            ready.append(i)
        chosen, failed = self._choose(batch, ready, logits)
        if self.prefix is not None:  # prompts read in full (and sound): their blocks for the requests after them
            for i in read:
                if i in chosen:
                    self._store_prefix(batch[i], i, answer=False)
        wants = [i for i in chosen if batch[i].logprobs is not None]
        logprobs = dict(zip(wants, torch.log_softmax(logits[wants].float(), -1))) if wants else {}
        for i, error in failed.items():
            finished.append((batch[i], TokenEvent(None, finish_reason="error", error=error)))
        for i, token in chosen.items():
            r = batch[i]
            logprob = top = None
            if i in logprobs:
                lp = logprobs[i]
                logprob = float(lp[token])
                if r.logprobs:
                    values, ids = torch.topk(lp, min(r.logprobs, lp.shape[-1]))
                    top = list(zip(ids.tolist(), values.tolist()))
            if r.first_token_at is None:
                r.first_token_at = now
            stop = token in r.stop_ids or token in r.params.stop_token_ids
            if not stop:
                r.output.append(token)
                events.append((r, TokenEvent(token, logprob, top)))
            full = len(r.prompt) + len(r.output) >= self.context
            if stop or len(r.output) >= r.params.max_new_tokens or full or r.cancelled:
                finished.append((r, TokenEvent(None, finish_reason="stop" if stop else "length")))
        poisoned = failed and not chosen and all(why == NON_FINITE for why in failed.values())
        self.failed_steps = self.failed_steps + 1 if poisoned else 0
        if finished:
            if self.prefix is not None:  # a finished conversation's blocks, for its next turn
                row_of = {r.id: i for i, r in enumerate(batch)}
                for r, last in finished:
                    if last.finish_reason != "error":
                        self._store_prefix(r, row_of[r.id], answer=True)
            with self.lock:
                self._drop([r for r, _ in finished])
        deliver(events + finished)  # after the rows are free, so a client that sees its end sees it gone
        return record

    def _forward(self, batch: list[Request]) -> tuple[list[Request], list[list[int]], torch.Tensor]:
        """One forward pass over the decoding rows and one over the prompt chunks: (rows run, their feeds, (rows, V)
        logits of each row's last fed token)."""
        n = len(batch)
        feeds = []
        for r in batch:
            if r._read < len(r.prompt):
                feeds.append(r.prompt[r._read: r._read + self.prefill_chunk])
            else:
                feeds.append([r.output[-1]])
        decoding = sum(1 for r in batch if r._read >= len(r.prompt))  # the first rows (see _partition)
        # Prompt tokens per step are bounded too: a burst of new requests is read over a few steps, each of which
        # also advances every decoding row, instead of one long step that stalls them all.
        end, used = decoding, 0
        while end < n and (end == decoding or used + len(feeds[end]) <= self.prefill_tokens_per_step):
            used += len(feeds[end])
            end += 1
        batch, feeds, n = batch[:end], feeds[:end], end
        parts = []
        for lo, hi in ((0, decoding), (decoding, n)):
            if lo == hi:
                continue
            width = max(len(f) for f in feeds[lo:hi])
            tokens = torch.zeros(hi - lo, width, dtype=torch.long, device=self.device)
            for i, f in enumerate(feeds[lo:hi]):
                tokens[i, : len(f)] = torch.tensor(f, dtype=torch.long)
            num_new = torch.tensor([len(f) for f in feeds[lo:hi]], device=self.device)
            view = KVCache.__new__(KVCache)  # rows lo..hi of the cache, as views
            view.k, view.v, view.lengths, view.max_len = (self.cache.k[:, lo:hi], self.cache.v[:, lo:hi],
                                                          self.cache.lengths[lo:hi], self.cache.max_len)
            parts.append(self.model(tokens, cache=view, num_new=num_new, last_only=True))  # (rows, V)
        return batch, feeds, torch.cat(parts) if len(parts) > 1 else parts[0]

    def _choose(self, batch: list[Request], ready: list[int], logits: torch.Tensor) -> tuple[dict, dict]:
        """The next token of each ready row ({row: token}) and the rows that failed ({row: why}).

        Greedy rows take one argmax over the batch, fetched with every row's finiteness in one transfer. Sampled
        rows go in groups of the same temperature, top-k, top-p and penalty, one pass of the processors per group,
        each row drawing from its own generator, so its token is what it gets alone. A group whose sampling raises
        is retried row by row, each under its own guard: a row that fails ends alone and the others' tokens are the
        same as without it."""
        top, finite = torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1).long()]).tolist()
        chosen: dict[int, int] = {}
        failed: dict[int, str] = {}
        groups: dict[tuple, list[int]] = {}
        for i in ready:
            p = batch[i].params
            if not finite[i]:
                failed[i] = NON_FINITE
            elif p.greedy and p.repetition_penalty == 1.0:
                chosen[i] = top[i]
            else:
                groups.setdefault((p.temperature, p.top_k, p.top_p, p.repetition_penalty), []).append(i)
        for rows in groups.values():
            try:
                drawn = dict(zip(rows, self._sample(batch, rows, logits)))
            except Exception as exc:  # these requests' parameters or logits; retried alone, the other rows go on
                log.warning("sampling failed for %d requests (%s); retrying them one by one", len(rows), exc)
                drawn = {}
                for i in rows:
                    try:
                        drawn[i] = self._sample(batch, [i], logits)[0]
                    except Exception as one:
                        failed[i] = f"sampling failed ({one})"
            for i, token in drawn.items():
                if token < 0:
                    failed[i] = UNSAMPLEABLE
                else:
                    chosen[i] = token
        return chosen, failed

    def _sample(self, batch: list[Request], rows: list[int], logits: torch.Tensor) -> list[int]:
        """The tokens of `rows`, which share their sampling parameters (-1: a row that could not be sampled)."""
        requests = [batch[i] for i in rows]
        params = requests[0].params
        history = None
        if params.repetition_penalty != 1.0:
            history = padded_history([r.prompt + r.output for r in requests], self.device)
        return next_tokens(logits[rows], params, history, [r._generator for r in requests]).tolist()
