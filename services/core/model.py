"""One READY model version: its runtime instances, its scheduler and its statistics.

Data flow: data plane ─▶ ServedModel.infer (response cache lookup, validate, submit) ─▶
DynamicBatcher ─▶ run_batch on a free instance (batch_io.py: concatenate inputs, Runtime.infer in a
worker thread, split outputs) ─▶ back to each caller with its timings, recorded in ModelStats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes, model_prep, tracing
from services.core.batch_io import gather_inputs, split_outputs
from services.core.batcher import DynamicBatcher, Pending, batch_policy_from_config
from services.core.errors import InternalError, ServingError
from services.core.ragged import BatchLayout, uses_ragged_batching
from services.core.rate_limiter import RateLimiter
from services.core.requests import Array, InferRequest, ItemResult
from services.core.response_cache import ModelCache, ResponseCache
from services.core.runtime import Runtime
from services.core.sequence_batcher import SequenceBatcher
from services.core.sequences import SequenceSettings
from services.core.statistics import ModelStats
from services.core.validation import RequestValidator
from services.core.warmup import run_warmup

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")

#: batches whose recent execution time (moving average) is below this run on the event loop
INLINE_EXECUTION_NS = 150_000
#: ... and below this when the batch holds every request the model has in flight: nothing else
#: is waiting, so a worker-thread round trip (two thread wake-ups) would only add latency
INLINE_WHEN_ALONE_NS = 1_000_000


#: what one execution gives: compute input, infer and output ns, and each request's outputs
Executed = tuple[int, int, int, list[dict[str, Array] | ServingError]]


class ServedModel:
    """A loaded model version. Create with ``await ServedModel.load(...)``; stop with ``close``."""

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        version_path: Path,
        instances: Sequence[Runtime],
        executor: ThreadPoolExecutor,
        cache: ResponseCache | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.version_str = str(version)
        self.version_path = version_path
        self.stats = ModelStats()
        self.validator = RequestValidator(config)
        self._instances = list(instances)
        self._executor = executor
        #: this version's use of the service's response cache (None: not cached)
        self._cache = (
            ModelCache(cache, self.stats)
            if cache is not None and config.response_cache.enable
            else None
        )
        self._batched = config.max_batch_size > 0
        #: how a batch with ragged inputs, batch inputs or outputs is joined and split
        self._layout = BatchLayout(config) if uses_ragged_batching(config) else None
        #: the model sends its responses itself (any number; ModelStreamInfer only)
        self.decoupled = config.model_transaction_policy.decoupled
        self._output_names = [o.name for o in config.output]
        self._output_datatypes = {
            o.name: dtypes.triton_from_config(o.data_type) for o in config.output
        }
        #: a stateful model's sequence settings (None: stateless)
        sequence = SequenceSettings.from_config(config, version_path)
        #: what the runtime is asked for: the outputs, and a stateful model's state outputs
        self._run_outputs = self._output_names + list(sequence.state_outputs if sequence else ())
        #: moving average of batch execution time; starts high so the first batches use a worker
        self._exec_ewma_ns = 10 * INLINE_EXECUTION_NS
        #: the instance that runs requests itself on the event loop (an ensemble), else None
        self._direct = next((r for r in self._instances if r.async_execution), None)
        #: requests between submit and result on the batched path (the direct path counts
        #: in ``_inflight``)
        self._queued = 0
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher: DynamicBatcher[InferRequest, ItemResult] | SequenceBatcher[ItemResult]
        if sequence is not None:
            self.batcher = SequenceBatcher(sequence, self._run_batch, len(self._instances))
        else:
            self.batcher = DynamicBatcher(
                batch_policy_from_config(config),
                self._run_batch,
                instances=len(self._instances),
                run_now=self._run_now,
            )

    @classmethod
    async def load(
        cls,
        config: mc.ModelConfig,
        version: int,
        version_path: Path,
        runtime_cls: type[Runtime],
        cache: ResponseCache | None = None,
        limiter: RateLimiter | None = None,
    ) -> ServedModel:
        """Create every instance (in worker threads), run warmup, start the scheduler; a model
        with ``response_cache`` enabled uses ``cache`` (none given: it runs every request); with
        ``limiter`` its instances run only while they hold their rate_limiter resources."""
        model_file = version_path / (
            config.default_model_filename or runtime_cls.default_model_filename
        )
        specs = model_prep.instance_specs(config)
        SequenceSettings.from_config(config, version_path)  # a bad section fails before loading
        loaded = model_prep.loaded_config(config, runtime_cls)
        executor = ThreadPoolExecutor(
            max_workers=len(specs), thread_name_prefix=f"{config.name}-v{version}"
        )
        loop = asyncio.get_running_loop()
        try:
            instances = await asyncio.gather(
                *(loop.run_in_executor(executor, runtime_cls, loaded, model_file, s) for s in specs)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        model = cls(config, version, version_path, instances, executor, cache)
        try:
            if config.model_warmup:
                await loop.run_in_executor(
                    executor, run_warmup, config, version_path, model._instances
                )
            limits = limiter.register(config) if limiter is not None else None
        except BaseException:
            await model.close()
            raise
        model.batcher.start(limits)
        return model

    @property
    def output_names(self) -> list[str]:
        return self._output_names

    def output_datatype(self, name: str) -> str:
        return self._output_datatypes[name]

    async def infer(self, request: InferRequest) -> ItemResult:
        """The stored answer to the same inputs when the model caches responses, else run it."""
        if self._cache is None:
            return await self._infer(request)
        lookup = await self._cache.lookup(request)
        if lookup.outputs is not None:
            hit = ItemResult(lookup.outputs, 0, 0, 0, 0)
            self._trace_execution(hit)
            return hit
        try:
            result = await self._infer(request)
        except BaseException:
            self._cache.abandon(lookup)  # identical requests waiting for it run themselves
            raise
        self._cache.store(lookup, result.outputs)
        return result

    async def _infer(self, request: InferRequest) -> ItemResult:
        """Validate, queue, execute; record statistics either way."""
        if self._direct is not None:
            return await self._infer_direct(self._direct, request)
        self._queued += 1
        try:
            batch_size, signature = self.validator(request)
            result = await self.batcher.submit(
                request,
                batch_size=batch_size,
                signature=signature,
                priority=request.priority,
                timeout_us=request.timeout_us,
            )
        except asyncio.CancelledError:  # the caller gave up (or its call was cancelled)
            self.stats.record_request_failure(request_ns=self._elapsed(request), reason="CANCELED")
            raise
        except ServingError as err:
            self.stats.record_request_failure(request_ns=self._elapsed(request), reason=err.reason)
            raise
        except Exception:
            self.stats.record_request_failure(request_ns=self._elapsed(request), reason="BACKEND")
            raise
        finally:
            self._queued -= 1
        self.stats.record_request_success(
            request_ns=self._elapsed(request),
            queue_ns=result.queue_ns,
            compute_input_ns=result.compute_input_ns,
            compute_infer_ns=result.compute_infer_ns,
            compute_output_ns=result.compute_output_ns,
        )
        self._trace_execution(result)
        return result

    def _trace_execution(self, result: ItemResult) -> None:
        """The request's queue wait and batch execution as child spans of its (sampled) span,
        which learns the version that served it. The batch ran in the batcher's task, where the
        request's trace context is not current: the spans are recorded here, afterwards."""
        if not tracing.recording():
            return
        tracing.annotate({tracing.MODEL_VERSION: self.version_str})
        if not result.batch_start_ns:
            return
        attributes = tracing.model_attributes(self.name, self.version_str)
        start = result.batch_start_ns
        tracing.record_span("queue", start - result.queue_ns, start, attributes)
        attributes[tracing.BATCH_SIZE] = result.batch_size
        tracing.record_span("compute", start, result.batch_end_ns, attributes)

    async def _infer_direct(self, runtime: Runtime, request: InferRequest) -> ItemResult:
        """Validate and run one request on the loop, without queueing (async runtimes)."""
        self._inflight += 1
        self._idle.clear()
        start = time.monotonic_ns()
        try:
            batch_size, _ = self.validator(request)
            outputs = await runtime.infer_async(request, self._output_names)
        except asyncio.CancelledError:
            self.stats.record_request_failure(request_ns=self._elapsed(request), reason="CANCELED")
            raise
        except ServingError as err:
            self.stats.record_request_failure(request_ns=self._elapsed(request), reason=err.reason)
            raise
        except Exception as exc:
            self.stats.record_request_failure(request_ns=self._elapsed(request), reason="BACKEND")
            log.exception("model %r version %d: request failed", self.name, self.version)
            raise InternalError(
                f"model '{self.name}' failed to execute the request: {type(exc).__name__}"
            ) from exc
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        infer_ns = time.monotonic_ns() - start
        # a decoupled model's outputs went to the request's response stream
        missing = [] if self.decoupled else [n for n in self._output_names if n not in outputs]
        if missing:
            raise InternalError(f"model '{self.name}' returned no value for outputs {missing}")
        count = batch_size if self._batched else 1
        self.stats.record_execution(
            batch_size=count,
            inference_count=count,
            compute_input_ns=0,
            compute_infer_ns=infer_ns,
            compute_output_ns=0,
        )
        self.stats.record_request_success(
            request_ns=self._elapsed(request),
            queue_ns=0,
            compute_input_ns=0,
            compute_infer_ns=infer_ns,
            compute_output_ns=0,
        )
        return ItemResult(outputs, 0, 0, infer_ns, 0)

    @staticmethod
    def _elapsed(request: InferRequest) -> int:
        return time.monotonic_ns() - request.arrival_ns if request.arrival_ns else 0

    def _inline(self, runtime: Runtime, items: Sequence[Pending[InferRequest]]) -> bool:
        """Whether this batch runs on the loop thread: a worker-thread round trip would cost
        more than the work itself (and the loop has nothing else to overlap it with)."""
        ewma = self._exec_ewma_ns
        return (
            len(self._instances) == 1
            and runtime.runs_inline
            and (
                ewma < INLINE_EXECUTION_NS
                or (ewma < INLINE_WHEN_ALONE_NS and self._queued == len(items))
            )
        )

    def _run_now(
        self, instance: int, items: Sequence[Pending[InferRequest]]
    ) -> list[ItemResult | ServingError] | None:
        """The batcher's ``run_now``: the batch's results when it runs inline, else None."""
        runtime = self._instances[instance]
        if not self._inline(runtime, items):
            return None
        sizes = [it.batch_size for it in items]
        return self._results(
            items, sizes, self._execute(runtime, [it.payload for it in items], sizes)
        )

    async def _run_batch(
        self, instance: int, items: Sequence[Pending[InferRequest]]
    ) -> list[ItemResult | ServingError]:
        runtime = self._instances[instance]
        payloads = [it.payload for it in items]
        sizes = [it.batch_size for it in items]
        if self._inline(runtime, items):
            timed = self._execute(runtime, payloads, sizes)
        else:
            timed = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._execute, runtime, payloads, sizes
            )
        return self._results(items, sizes, timed)

    def _results(
        self, items: Sequence[Pending[InferRequest]], sizes: list[int], timed: Executed
    ) -> list[ItemResult | ServingError]:
        """Each request's result of an executed batch; the execution goes into the statistics."""
        t_in, t_infer, t_out, outputs = timed
        self._exec_ewma_ns += (t_in + t_infer + t_out - self._exec_ewma_ns) // 8
        done = time.monotonic_ns()
        total = sum(sizes) if self._batched else 1
        self.stats.record_execution(
            batch_size=total,
            inference_count=total,
            compute_input_ns=t_in,
            compute_infer_ns=t_infer,
            compute_output_ns=t_out,
        )
        return [
            out
            if isinstance(out, ServingError)
            else ItemResult(
                out, it.start_ns - it.enqueue_ns, t_in, t_infer, t_out, it.start_ns, done, total
            )
            for it, out in zip(items, outputs, strict=True)
        ]

    def _execute(
        self, runtime: Runtime, payloads: list[InferRequest], sizes: list[int]
    ) -> Executed:
        """Runs in the instance's worker thread: gather inputs, run, scatter outputs."""
        t0 = time.monotonic_ns()
        if runtime.takes_request_list:
            per_request = self._guarded(runtime.infer_requests, payloads, sizes)
            if len(per_request) != len(payloads):
                raise InternalError(
                    f"model '{self.name}' returned {len(per_request)} results for "
                    f"{len(payloads)} requests"
                )
            return 0, time.monotonic_ns() - t0, 0, per_request
        layout = self._layout
        inputs = gather_inputs(payloads) if layout is None else layout.gather(payloads)
        t1 = time.monotonic_ns()
        results = self._guarded(runtime.infer, inputs, sizes)
        t2 = time.monotonic_ns()
        split: list[dict[str, Array] | ServingError] = list(
            split_outputs(self.name, results, self._run_outputs, sizes)
            if layout is None
            else layout.split(results, self._run_outputs, payloads, sizes)
        )
        t3 = time.monotonic_ns()
        return t1 - t0, t2 - t1, t3 - t2, split

    def _guarded(self, run: Callable[[A, Sequence[str]], R], arg: A, sizes: list[int]) -> R:
        """Call the runtime; a non-ServingError becomes a generic INTERNAL error (logged)."""
        try:
            return run(arg, self._run_outputs)
        except ServingError:
            raise
        except Exception as exc:
            log.exception(
                "model %r version %d: runtime failed on a batch of %d",
                self.name,
                self.version,
                sum(sizes),
            )
            raise InternalError(
                f"model '{self.name}' failed to execute the batch: {type(exc).__name__}"
            ) from exc

    async def close(self) -> None:
        """Finish everything queued or running, then release the instances."""
        await self.batcher.close()
        await self._idle.wait()
        if self._cache is not None:
            self._cache.close()
        loop = asyncio.get_running_loop()
        for runtime in self._instances:
            try:
                await loop.run_in_executor(self._executor, runtime.unload)
            except Exception:
                log.exception("model %r version %d: unload failed", self.name, self.version)
        self._executor.shutdown(wait=False)
