"""TensorRT backend: the production path on the box (behind the same Runner as ONNX Runtime).

One runner per model. At open: the engine comes from the cache under `<state_dir>/engines/`
(built there when missing or unusable, see engines/build.py), then every buffer is allocated
once for the fixed tile shape and the profile's max batch: device input and output buffers
(pycuda ``mem_alloc``, in the device's primary context) and two sets of pinned host buffers.
Tensor addresses are set once; inference is ``execute_async_v3`` on an explicit stream, and its
result is checked.

Double buffering: while the GPU copies and computes one chunk (one stream: H2D, execute, D2H,
event), the host prepares the next chunk in the other pinned slot, then waits for the first
and copies its output out. :meth:`TensorRTRunner.infer_pipelined` extends the overlap to the
caller: the next batch is taken from its iterable (host-side tile preparation) while the GPU
works on the previous one.

Buffers are reused between calls; the arrays returned are always fresh copies (callers may
keep them). The runner takes the newest cached plan for its model, precision, batch and
platform whatever workspace or optimisation level `appliance engines build` used; it builds
one with the defaults only when there is none (or the cached one does not deserialize).

With ``cuda_graph=True`` the execution for the fixed shape (max batch) is captured
once into a CUDA graph and replayed; chunks with fewer tiles are padded with zeros, whose
outputs are dropped. Without it only the batch dimension changes (profile min 1).

Everything is freed by an explicit :meth:`close` (or leaving the ``with`` block), never in
``__del__``. Not thread-safe: one runner per thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.runtime.base import BackendUnavailable, ModelError, ModelSpec, Runner

log = logging.getLogger(__name__)

SLOTS = 2
"""Pinned host buffer sets: one being filled by the host while the other is on the GPU."""
CAPTURE_MODE_THREAD_LOCAL = 1
"""CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: only this thread's unsafe calls break the capture."""


class ExecutionError(RuntimeError):
    """TensorRT or CUDA failed while running an engine; str(exc) is a one-line reason."""


def import_tensorrt() -> tuple[Any, Any]:
    """The tensorrt and pycuda.driver modules, or BackendUnavailable saying why not."""
    from appliance.runtime.select import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend tensorrt is unavailable: {reason}")
    import pycuda.driver as cuda
    import tensorrt as trt

    return trt, cuda


class PrimaryContext:
    """The device's primary context (the one the CUDA runtime, hence TensorRT, uses), retained
    once and made current only around each piece of work, so runners can share a thread."""

    def __init__(self, cuda: Any, device_index: int = 0) -> None:
        if isinstance(device_index, bool) or not isinstance(device_index, int) or device_index < 0:
            raise ValueError(f"`device_index` must be a non-negative int, got {device_index!r}")
        cuda.init()
        count = cuda.Device.count()
        if device_index >= count:
            raise BackendUnavailable(f"backend tensorrt is unavailable: no CUDA device {device_index} "
                                     f"({count} present)")
        self.cuda = cuda
        self.device_index = device_index
        self.device = cuda.Device(device_index)
        self._ctx = self.device.retain_primary_context()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self._ctx is None:
            raise RuntimeError("the CUDA context was released")
        self._ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def release(self) -> None:
        """Drop our reference to the primary context (idempotent)."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.push()
            ctx.detach()  # while current: releases the primary context and pops it


class CudaGraphs:
    """The few CUDA driver graph calls pycuda does not wrap, through ctypes; every result checked."""

    def __init__(self, lib: Any = None) -> None:
        if lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as exc:
                raise ExecutionError(f"cannot load libcuda.so.1 for CUDA graphs: {exc}") from None
        self._lib = lib
        vp, u64 = ctypes.c_void_p, ctypes.c_ulonglong
        for name, args in (
            ("cuStreamBeginCapture_v2", [vp, ctypes.c_int]),
            ("cuStreamEndCapture", [vp, ctypes.POINTER(vp)]),
            ("cuGraphInstantiateWithFlags", [ctypes.POINTER(vp), vp, u64]),
            ("cuGraphLaunch", [vp, vp]),
            ("cuGraphExecDestroy", [vp]),
            ("cuGraphDestroy", [vp]),
            ("cuGetErrorName", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int

    def _check(self, what: str, result: int) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(result, ctypes.byref(name))
            label = name.value.decode() if name.value else "unknown error"
            raise ExecutionError(f"{what} failed: {label} ({result})")

    def begin_capture(self, stream: int) -> None:
        self._check("cuStreamBeginCapture", self._lib.cuStreamBeginCapture_v2(stream, CAPTURE_MODE_THREAD_LOCAL))

    def end_capture(self, stream: int) -> int:
        graph = ctypes.c_void_p()
        self._check("cuStreamEndCapture", self._lib.cuStreamEndCapture(stream, ctypes.byref(graph)))
        return int(graph.value or 0)

    def instantiate(self, graph: int) -> int:
        exe = ctypes.c_void_p()
        self._check("cuGraphInstantiate", self._lib.cuGraphInstantiateWithFlags(ctypes.byref(exe), graph, 0))
        return int(exe.value or 0)

    def launch(self, exe: int, stream: int) -> None:
        self._check("cuGraphLaunch", self._lib.cuGraphLaunch(exe, stream))

    def destroy(self, exe: int | None, graph: int | None) -> None:
        if exe:
            self._check("cuGraphExecDestroy", self._lib.cuGraphExecDestroy(exe))
        if graph:
            self._check("cuGraphDestroy", self._lib.cuGraphDestroy(graph))


def load_graph_api() -> CudaGraphs:
    """The graph calls (a seam: tests give the runner a double of the driver instead)."""
    return CudaGraphs()


@dataclass
class _Slot:
    """One set of pinned host buffers, its completion event and the rows it holds in flight."""

    host_in: np.ndarray
    host_out: np.ndarray
    event: Any
    rows: int = 0
    """Tiles of the chunk in flight (0: free)."""


class TensorRTRunner(Runner):
    """A TensorRT engine for one model; see the module docstring for buffers and overlap."""

    name = "tensorrt"
    device = "cuda"
    reuses_output_buffers = False
    """Outputs are fresh arrays on every call (the pinned/device buffers behind them are reused)."""

    def __init__(
        self,
        spec: ModelSpec,
        precision: str = "fp32",
        *,
        max_batch: int | None = None,
        engine_dir: str | Path | None = None,
        device_index: int = 0,
        cuda_graph: bool = False,
        build_missing: bool = True,
        workspace_gb: float | None = None,
        opt_level: int | None = None,
    ) -> None:
        from engines.build import (
            DEFAULT_MAX_BATCH,
            DEFAULT_OPT_LEVEL,
            DEFAULT_WORKSPACE_GB,
            BuildSettings,
            detect_platform,
            load_engine,
            make_logger,
        )
        from engines.cache import EngineCache, default_engine_dir

        super().__init__(spec, precision)
        settings = BuildSettings(
            precision=precision,
            max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
            workspace_gb=DEFAULT_WORKSPACE_GB if workspace_gb is None else workspace_gb,
            opt_level=DEFAULT_OPT_LEVEL if opt_level is None else opt_level,
        )
        self.max_batch = settings.max_batch
        self.cuda_graph = bool(cuda_graph)
        self._closed = False
        self._ctx: PrimaryContext | None = None
        self._runtime = self._engine = self._context = self._stream = None
        self._d_in: Any = None
        self._d_outs: dict[str, Any] = {}
        self._slots: list[_Slot] = []
        self._rows_set = 0
        self._graphs: CudaGraphs | None = None
        self._graph: int | None = None
        self._graph_exec: int | None = None

        trt, cuda = import_tensorrt()
        self._trt, self._cuda = trt, cuda
        self._ctx = PrimaryContext(cuda, device_index)
        try:
            with self._ctx.active():
                platform = detect_platform(trt, cuda, device_index)
                self.gpu_name = platform.gpu_name
                self._logger = make_logger(trt)
                self._runtime = trt.Runtime(self._logger)
                cache = EngineCache(engine_dir if engine_dir is not None else default_engine_dir())
                self._engine, self.engine_record = load_engine(
                    trt, self._runtime, spec, settings, platform, cache, build_missing=build_missing,
                    any_tuning=True)
                self._context = self._engine.create_execution_context()
                if self._context is None:
                    raise ExecutionError(f"TensorRT could not create an execution context for {spec.name} "
                                         f"(out of GPU memory?)")
                self._bind()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _bind(self) -> None:
        """Check the engine's tensors against the manifest, allocate every buffer once, set addresses."""
        trt, cuda, engine, spec = self._trt, self._cuda, self._engine, self.spec
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [spec.input_name]:
            raise ModelError(f"engine for {spec.name} must have one input {spec.input_name!r}, has {inputs}")
        if spec.output_name not in outputs:
            raise ModelError(f"engine for {spec.name} has no output {spec.output_name!r} (has {outputs})")
        tile = tuple(spec.tile_shape)
        _min, _opt, top = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(spec.input_name, 0))
        if top[1:] != (1, *tile) or top[0] < self.max_batch:
            raise ModelError(f"engine for {spec.name} has profile max {top}, expected "
                             f"({self.max_batch}, 1, {', '.join(map(str, tile))})")
        self._set_rows(self.max_batch)
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(spec.input_name)))
        out_shapes = {n: tuple(int(d) for d in self._context.get_tensor_shape(n)) for n in outputs}
        want = (self.max_batch, spec.n_classes, *tile)
        if out_shapes[spec.output_name] != want:
            raise ModelError(f"engine for {spec.name} gives output shape {out_shapes[spec.output_name]} "
                             f"at batch {self.max_batch}, expected {want}")
        self._out_dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in outputs}

        in_shape = (self.max_batch, 1, *tile)
        self._d_in = cuda.mem_alloc(int(np.prod(in_shape)) * self._in_dtype.itemsize)
        self._address(spec.input_name, self._d_in)
        for n in outputs:
            self._d_outs[n] = cuda.mem_alloc(int(np.prod(out_shapes[n])) * self._out_dtypes[n].itemsize)
            self._address(n, self._d_outs[n])
        out_dtype = self._out_dtypes[spec.output_name]
        for _ in range(SLOTS):
            host_in = cuda.pagelocked_empty(in_shape, self._in_dtype)
            host_in.fill(0)
            self._slots.append(_Slot(host_in, cuda.pagelocked_empty(want, out_dtype), cuda.Event()))
        self._stream = cuda.Stream()

    def _address(self, name: str, mem: Any) -> None:
        if not self._context.set_tensor_address(name, int(mem)):
            raise ExecutionError(f"TensorRT refused the address of tensor {name!r} ({self.spec.name})")

    def _set_rows(self, rows: int) -> None:
        if rows == self._rows_set:
            return
        shape = (rows, 1, *self.spec.tile_shape)
        if not self._context.set_input_shape(self.spec.input_name, shape):
            raise ExecutionError(f"TensorRT refused input shape {shape} for {self.spec.name}")
        self._rows_set = rows

    # ------------------------------------------------------------------ execution

    def _execute(self) -> None:
        if self._graph_exec is not None:
            self._graphs.launch(self._graph_exec, self._stream.handle)  # type: ignore[union-attr]
            return
        if not self._context.execute_async_v3(self._stream.handle):
            raise ExecutionError(f"TensorRT execute_async_v3 failed for {self.spec.name}")

    def _capture_graph(self) -> None:
        """Capture the fixed-shape execution once; fall back to plain execution (one warning) if
        CUDA graphs are not available or this engine cannot be captured."""
        self._set_rows(self.max_batch)
        # One ordinary execution first: TensorRT finishes deferred setup outside the capture.
        self._execute()
        self._stream.synchronize()
        try:
            graphs = load_graph_api()
            graph, exe = self._capture(graphs)
        except ExecutionError as exc:
            log.warning("CUDA graph not used for %s (%s); running the engine directly", self.spec.name, exc)
            self.cuda_graph = False
            return
        self._graphs, self._graph, self._graph_exec = graphs, graph, exe

    def _capture(self, graphs: CudaGraphs) -> tuple[int, int]:
        handle = self._stream.handle
        graphs.begin_capture(handle)
        try:
            ok = self._context.execute_async_v3(handle)
        finally:
            graph = graphs.end_capture(handle)  # always leave capture mode
        try:
            if not ok:
                raise ExecutionError(f"TensorRT execute_async_v3 failed while capturing a CUDA graph "
                                     f"for {self.spec.name}")
            return graph, graphs.instantiate(graph)
        except ExecutionError:
            graphs.destroy(None, graph)
            raise

    def _enqueue(self, slot: _Slot, chunk: np.ndarray) -> None:
        """Host-side: fill the slot's pinned input; then H2D, execute, D2H and the event on the stream."""
        cuda = self._cuda
        m = chunk.shape[0]
        if self.cuda_graph and self._graph_exec is None:
            self._capture_graph()
        rows = self.max_batch if self._graph_exec is not None else m
        np.copyto(slot.host_in[:m], chunk, casting="same_kind")
        if rows > m:
            slot.host_in[m:rows] = 0  # padding tiles: their outputs are dropped
        self._set_rows(rows)
        cuda.memcpy_htod_async(self._d_in, slot.host_in[:rows], self._stream)
        self._execute()
        cuda.memcpy_dtoh_async(slot.host_out[:rows], self._d_outs[self.spec.output_name], self._stream)
        slot.event.record(self._stream)
        slot.rows = m

    def _wait(self, slot: _Slot) -> np.ndarray:
        """Block until the slot's chunk is back; a view of its output rows (valid until reused)."""
        slot.event.synchronize()
        m, slot.rows = slot.rows, 0
        return slot.host_out[:m]

    def _pipeline(self, chunks: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
        """(tag, chunk of <= max_batch tiles) in, (tag, output view) out, in order. The next chunk
        is drawn from ``chunks`` while the GPU works on the ones in flight (at most SLOTS). The
        consumer must copy each view before asking for the next item."""
        if self._closed:
            raise RuntimeError(f"the TensorRT runner for {self.spec.name} is closed")
        assert self._ctx is not None
        inflight: deque[tuple[Any, _Slot]] = deque()
        if any(slot.rows for slot in self._slots):  # a previous pipeline was abandoned
            with self._ctx.active():
                self._drain()
        done = False
        try:
            for i, (tag, chunk) in enumerate(chunks):
                slot = self._slots[i % SLOTS]
                if slot.rows:
                    done_tag, done = inflight.popleft()
                    with self._ctx.active():
                        view = self._wait(done)
                    yield done_tag, view
                with self._ctx.active():
                    self._enqueue(slot, chunk)
                inflight.append((tag, slot))
            while inflight:
                last_tag, last = inflight.popleft()
                with self._ctx.active():
                    view = self._wait(last)
                yield last_tag, view
            done = True
        finally:
            if not done and not self._closed:  # an error or an abandoned iteration: nothing left in flight
                with self._ctx.active():
                    self._drain()

    def _drain(self) -> None:
        """Wait for everything on the stream (including work of a chunk that failed half-way)."""
        self._stream.synchronize()
        for slot in self._slots:
            slot.rows = 0

    def _chunks(self, batch: np.ndarray, tag: Any = None) -> Iterator[tuple[Any, np.ndarray]]:
        for start in range(0, batch.shape[0], self.max_batch):
            yield (tag, start), batch[start:start + self.max_batch]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((batch.shape[0], self.spec.n_classes, *self.spec.tile_shape), np.float32)
        for (_tag, start), view in self._pipeline(self._chunks(batch)):
            out[start:start + view.shape[0]] = view
        return out

    def infer_pipelined(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """One fresh float32 output per batch, in order. Each batch is checked like :meth:`infer`;
        the next one is taken from ``batches`` (so a generator prepares it) while the GPU runs
        the previous one."""

        def chunks() -> Iterator[tuple[Any, np.ndarray]]:
            for k, batch in enumerate(batches):
                self._check_batch(batch)
                for (_tag, start), chunk in self._chunks(batch, k):
                    yield (k, start, batch.shape[0]), chunk

        out: np.ndarray | None = None
        for (_k, start, total), view in self._pipeline(chunks()):
            if start == 0:
                out = np.empty((total, self.spec.n_classes, *self.spec.tile_shape), np.float32)
            assert out is not None
            out[start:start + view.shape[0]] = view
            if start + view.shape[0] == total:
                yield out
                out = None

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Free the graph, the TensorRT objects, device and pinned memory, the stream; release
        the context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        try:
            with ctx.active():
                if self._stream is not None:
                    self._stream.synchronize()
                if self._graphs is not None:
                    self._graphs.destroy(self._graph_exec, self._graph)
                self._graphs = self._graph = self._graph_exec = None
                # TensorRT objects go before the memory they point at; the runtime last of them.
                self._context = None
                self._engine = None
                self._runtime = None
                for mem in [self._d_in, *self._d_outs.values()]:
                    if mem is not None:
                        mem.free()
                self._d_in, self._d_outs = None, {}
                for slot in self._slots:
                    slot.host_in.base.free()
                    slot.host_out.base.free()
                self._slots = []
                self._stream = None
        finally:
            ctx.release()
