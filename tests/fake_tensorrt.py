"""TEST DOUBLES of TensorRT and pycuda: `FakeTensorRT`, `FakePyCuda`, `FakeCudaGraphs`.

NOT the real libraries. TensorRT and pycuda cannot be installed on the development machines, so
the tests put these modules in ``sys.modules`` (``install(monkeypatch)``) and run the real
builder, cache and runner code against them. They implement exactly the API subset that
`engines/` and `appliance/runtime/tensorrt.py` use, with the behaviour that matters:

- Device memory is host memory behind integer addresses; freeing twice, or touching freed or
  unallocated memory, raises. Async copies need pinned host memory.
- Streams are lazy: copies and executions run only when the stream, or an event recorded on
  it, is synchronised, and a copy reads its host source then, not when it was enqueued (so a
  pinned buffer overwritten too early gives a wrong answer, as on a GPU).
- A "plan" is a header plus the ONNX bytes; the engine computes the real answer with ONNX
  Runtime, so parity checks are meaningful. With ``BuilderFlag.FP16`` (TensorRT 10) inputs and
  outputs are rounded through float16; a TensorRT 11 fake has no FP16 flag at all and runs the
  fp16 ONNX file it was given.
- A plan from another (fake) TensorRT version, or garbage, does not deserialize (None).

Every call the tests assert on is counted or recorded (allocations, builds, executions, shapes).
"""

from __future__ import annotations

import enum
import hashlib
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PLAN_MAGIC = b"FAKE-TENSORRT-PLAN\n"
TIMING_MAGIC = b"FAKE-TENSORRT-TIMING\n"


# ============================================================================ pycuda


class FakeCudaError(RuntimeError):
    """What the fake driver raises where pycuda would raise pycuda.driver.Error."""


class FakeHostAllocation(bytearray):
    """Pinned host memory (pycuda's HostAllocation): the `.base` of a pagelocked array."""

    def __init__(self, nbytes: int, state: CudaState) -> None:
        super().__init__(nbytes)
        self._state = state
        self.freed = False

    def free(self) -> None:
        if self.freed:
            raise FakeCudaError("pinned host memory freed twice")
        self.freed = True
        self._state.pinned_live.discard(id(self))
        self._state.pinned_frees += 1


class FakeDeviceAllocation:
    """Device memory (pycuda's DeviceAllocation): int() is its address."""

    def __init__(self, address: int, nbytes: int, state: CudaState) -> None:
        self.address, self.nbytes, self._state = address, nbytes, state

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        if self.address not in self._state.memory:
            raise FakeCudaError("device memory freed twice")
        del self._state.memory[self.address]
        self._state.device_frees += 1


@dataclass
class CudaState:
    """Everything the fake driver knows; the tests read the counters."""

    device_name: str = "FakeGPU (test double)"
    compute_capability: tuple[int, int] = (9, 0)
    driver_version: int = 13000
    device_count: int = 1
    memory: dict[int, bytearray] = field(default_factory=dict, repr=False)
    next_address: int = 0x10000
    device_allocs: int = 0
    device_frees: int = 0
    pinned_allocs: int = 0
    pinned_frees: int = 0
    pinned_live: set[int] = field(default_factory=set)
    streams: dict[int, FakeStream] = field(default_factory=dict)
    retained: int = 0
    released: int = 0
    context_depth: int = 0
    pushes: int = 0
    copies_h2d: int = 0
    copies_d2h: int = 0
    log: list[str] = field(default_factory=list)
    """Synchronisation points and host-side marks, in order (tests add their own marks)."""

    def device_view(self, address: int, nbytes: int) -> memoryview:
        """The bytes at ``address`` (inside one live allocation), for reading or writing."""
        for base, buf in self.memory.items():
            if base <= address and address + nbytes <= base + len(buf):
                return memoryview(buf)[address - base:address - base + nbytes]
        raise FakeCudaError(f"device address {address:#x} (+{nbytes} bytes) is not allocated")

    @property
    def pending_ops(self) -> int:
        return sum(len(s.queue) for s in self.streams.values())


class FakeStream:
    def __init__(self, state: CudaState) -> None:
        self._state = state
        self.handle = 0x5000 + len(state.streams)
        self.queue: list[Callable[[], None]] = []
        self.capturing: list[Callable[[], None]] | None = None
        state.streams[self.handle] = self

    def enqueue(self, op: Callable[[], None]) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            self.queue.append(op)

    def run_until(self, count: int) -> None:
        if self.capturing is not None:
            raise FakeCudaError("synchronising a stream that is being captured")
        for op in self.queue[:count]:
            op()
        del self.queue[:count]

    def synchronize(self) -> None:
        self._state.log.append("stream.synchronize")
        self.run_until(len(self.queue))

    def is_done(self) -> bool:
        return not self.queue


class FakeEvent:
    def __init__(self, state: CudaState) -> None:
        self._state = state
        self._stream: FakeStream | None = None
        self._marker: object | None = None

    def record(self, stream: FakeStream) -> None:
        if stream.capturing is not None:
            raise FakeCudaError("the fake does not capture event records")

        def op() -> None:
            return None

        marker = object()
        op.marker = marker  # type: ignore[attr-defined]
        self._stream, self._marker = stream, marker
        stream.enqueue(op)

    def synchronize(self) -> None:
        self._state.log.append("event.synchronize")
        if self._stream is None:
            return
        queue = self._stream.queue
        for i, op in enumerate(queue):
            if getattr(op, "marker", None) is self._marker:
                self._stream.run_until(i + 1)
                return

    def query(self) -> bool:
        return self._stream is None or all(getattr(op, "marker", None) is not self._marker
                                           for op in self._stream.queue)


def _pinned_owner(array: np.ndarray) -> FakeHostAllocation | None:
    obj: Any = array
    while obj is not None and not isinstance(obj, FakeHostAllocation):
        obj = getattr(obj, "base", None)
    return obj


class FakePyCuda(types.ModuleType):
    """TEST DOUBLE of the `pycuda` package; `.driver` is the fake `pycuda.driver`."""

    def __init__(self, **state: Any) -> None:
        super().__init__("pycuda")
        self.__file__ = __file__
        self.state = CudaState(**state)
        self.driver = _make_driver(self.state)

    def install(self, monkeypatch: Any) -> FakePyCuda:
        monkeypatch.setitem(sys.modules, "pycuda", self)
        monkeypatch.setitem(sys.modules, "pycuda.driver", self.driver)
        return self


def _make_driver(state: CudaState) -> types.ModuleType:
    drv = types.ModuleType("pycuda.driver")
    drv.Error = FakeCudaError  # type: ignore[attr-defined]

    def init() -> None:
        return None

    class Context:
        def push(self) -> None:
            state.context_depth += 1
            state.pushes += 1

        @staticmethod
        def pop() -> None:
            if state.context_depth < 1:
                raise FakeCudaError("cannot pop non-current context")
            state.context_depth -= 1

        def detach(self) -> None:
            # Like pycuda's primary context while current: release it and pop it.
            state.released += 1
            Context.pop()

    class Device:
        def __init__(self, index: int) -> None:
            if not 0 <= index < state.device_count:
                raise FakeCudaError(f"invalid device ordinal {index}")
            self.index = index

        @staticmethod
        def count() -> int:
            return state.device_count

        def name(self) -> str:
            return state.device_name

        def compute_capability(self) -> tuple[int, int]:
            return state.compute_capability

        def retain_primary_context(self) -> Context:
            state.retained += 1
            return Context()

    def get_driver_version() -> int:
        return state.driver_version

    def mem_alloc(nbytes: int) -> FakeDeviceAllocation:
        if nbytes <= 0:
            raise FakeCudaError("mem_alloc of zero bytes")
        address = state.next_address
        state.next_address += (nbytes + 0xFFFF) // 0x10000 * 0x10000 + 0x10000
        state.memory[address] = bytearray(nbytes)
        state.device_allocs += 1
        return FakeDeviceAllocation(address, nbytes, state)

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        alloc = FakeHostAllocation(int(np.prod(shape)) * dtype.itemsize, state)
        state.pinned_allocs += 1
        state.pinned_live.add(id(alloc))
        return np.ndarray(shape, dtype, buffer=alloc)

    def _check_pinned(array: np.ndarray, what: str) -> None:
        owner = _pinned_owner(array)
        if owner is None:
            raise FakeCudaError(f"{what}: host buffer is not page-locked (async copies need pinned memory)")
        if owner.freed:
            raise FakeCudaError(f"{what}: host buffer was freed")
        if not array.flags.c_contiguous:
            raise FakeCudaError(f"{what}: host buffer is not contiguous")

    def memcpy_htod_async(dest: Any, src: np.ndarray, stream: FakeStream) -> None:
        _check_pinned(src, "memcpy_htod_async")
        address, nbytes = int(dest), src.nbytes
        state.device_view(address, nbytes)  # fail now on a bad address, as the driver does
        state.log.append("memcpy_htod_async")

        def op() -> None:  # reads the host buffer when the copy runs, not when it was enqueued
            state.device_view(address, nbytes)[:] = src.tobytes()
            state.copies_h2d += 1

        stream.enqueue(op)

    def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: FakeStream) -> None:
        _check_pinned(dest, "memcpy_dtoh_async")
        address, nbytes = int(src), dest.nbytes
        state.device_view(address, nbytes)

        def op() -> None:
            flat = dest.reshape(-1).view(np.uint8)
            flat[:] = np.frombuffer(state.device_view(address, nbytes), np.uint8)
            state.copies_d2h += 1

        stream.enqueue(op)

    drv.init = init  # type: ignore[attr-defined]
    drv.Context = Context  # type: ignore[attr-defined]
    drv.Device = Device  # type: ignore[attr-defined]
    drv.get_driver_version = get_driver_version  # type: ignore[attr-defined]
    drv.mem_alloc = mem_alloc  # type: ignore[attr-defined]
    drv.pagelocked_empty = pagelocked_empty  # type: ignore[attr-defined]
    drv.memcpy_htod_async = memcpy_htod_async  # type: ignore[attr-defined]
    drv.memcpy_dtoh_async = memcpy_dtoh_async  # type: ignore[attr-defined]
    drv.Stream = lambda flags=0: FakeStream(state)  # type: ignore[attr-defined]
    drv.Event = lambda flags=0: FakeEvent(state)  # type: ignore[attr-defined]
    return drv


class FakeCudaGraphs:
    """TEST DOUBLE of appliance.runtime.tensorrt.CudaGraphs (the libcuda graph calls): capture
    records what is enqueued on the stream instead of running it; launch enqueues it again."""

    def __init__(self, cuda: FakePyCuda, fail_instantiate: bool = False) -> None:
        self._state = cuda.state
        self.fail_instantiate = fail_instantiate
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.execs: dict[int, int] = {}
        self.captures = self.launches = self.destroyed = 0

    def begin_capture(self, stream: int) -> None:
        s = self._state.streams[stream]
        if s.capturing is not None:
            raise FakeCudaError("stream is already capturing")
        s.capturing = []

    def end_capture(self, stream: int) -> int:
        s = self._state.streams[stream]
        ops, s.capturing = s.capturing, None
        graph = 0x900 + len(self.graphs) + 1
        self.graphs[graph] = list(ops or [])
        self.captures += 1
        return graph

    def instantiate(self, graph: int) -> int:
        from appliance.runtime.tensorrt import ExecutionError

        if self.fail_instantiate:
            raise ExecutionError("cuGraphInstantiate failed: CUDA_ERROR_NOT_SUPPORTED (801)")
        exe = 0xE00 + len(self.execs) + 1
        self.execs[exe] = graph
        return exe

    def launch(self, exe: int, stream: int) -> None:
        s = self._state.streams[stream]
        for op in self.graphs[self.execs[exe]]:
            s.enqueue(op)
        self.launches += 1

    def destroy(self, exe: int | None, graph: int | None) -> None:
        if exe:
            del self.execs[exe]
        if graph:
            del self.graphs[graph]
        self.destroyed += 1


# ============================================================================ tensorrt


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
       DataType.INT32: np.int32, DataType.BOOL: np.bool_}
_ORT_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag10(enum.IntEnum):
    FP16 = 0
    BF16 = 1
    INT8 = 2
    TF32 = 6


class BuilderFlag11(enum.IntEnum):
    """TensorRT 11 removed the weak-typing precision flags (FP16, BF16, INT8, ...)."""

    TF32 = 6
    REFIT = 7


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Severity, msg: str) -> None:  # pragma: no cover - overridden
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING,
                                                     Severity.INFO, Severity.VERBOSE)

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        super().__init__()


@dataclass
class FakeITensor:
    name: str
    shape: tuple[int, ...]
    dtype: DataType


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: bytes = b""
        self.onnx_path: str | None = None
        self.inputs: list[FakeITensor] = []
        self.outputs: list[FakeITensor] = []

    @property
    def strongly_typed(self) -> bool:
        return bool(self.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> FakeITensor:
        return self.inputs[i]

    def get_output(self, i: int) -> FakeITensor:
        return self.outputs[i]


class FakeParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text


def _ort_session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _dims(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape)


class FakeOnnxParser:
    def __init__(self, network: FakeNetwork, logger: ILogger) -> None:
        self.network, self.logger = network, logger
        self.errors: list[FakeParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> FakeParserError:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        data = Path(path).read_bytes()
        try:
            session = _ort_session(data)
        except Exception as exc:  # onnxruntime's errors are untyped; the fake reports any of them
            self.errors.append(FakeParserError(f"ModelImporter: failed to parse the ONNX file: {exc}"))
            return False
        net = self.network
        net.onnx, net.onnx_path = data, path
        net.inputs = [FakeITensor(i.name, _dims(i.shape), _ORT_TYPES[i.type]) for i in session.get_inputs()]
        net.outputs = [FakeITensor(o.name, _dims(o.shape), _ORT_TYPES[o.type]) for o in session.get_outputs()]
        return True


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class FakeTimingCache:
    def __init__(self, entries: list[str], version: str) -> None:
        self.entries, self.version = entries, version

    def serialize(self) -> bytes:
        return TIMING_MAGIC + json.dumps({"version": self.version, "entries": self.entries}).encode()


class FakeBuilderConfig:
    def __init__(self, trt: FakeTensorRT) -> None:
        self._trt = trt
        self.flags: set[Any] = set()
        self.pools: dict[Any, int] = {}
        self.builder_optimization_level = 3
        self.profiles: list[FakeProfile] = []
        self.timing_cache: FakeTimingCache | None = None

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def get_flag(self, flag: Any) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pools[pool] = int(size)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        for lo, opt, hi in profile.shapes.values():
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache | None:
        if not data:
            return FakeTimingCache([], self._trt.__version__)
        if not bytes(data).startswith(TIMING_MAGIC):
            return None
        raw = json.loads(bytes(data)[len(TIMING_MAGIC):])
        return FakeTimingCache(list(raw["entries"]), raw["version"])

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.version != self._trt.__version__ and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


class FakeBuilder:
    def __init__(self, trt: FakeTensorRT, logger: ILogger) -> None:
        self._trt, self.logger = trt, logger

    def create_network(self, flags: int = 0) -> FakeNetwork:
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeBuilderConfig:
        return FakeBuilderConfig(self._trt)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeBuilderConfig) -> bytes | None:
        trt = self._trt
        fp16_flag = trt.major < 11 and trt.BuilderFlag.FP16 in config.flags
        strongly = network.strongly_typed or trt.major >= 11
        record = {
            "onnx_path": network.onnx_path, "onnx_sha256": hashlib.sha256(network.onnx).hexdigest(),
            "network_flags": network.flags, "strongly_typed": network.strongly_typed,
            "builder_flags": sorted(getattr(f, "name", str(f)) for f in config.flags), "fp16_flag": fp16_flag,
            "workspace": config.pools.get(MemoryPoolType.WORKSPACE), "opt_level": config.builder_optimization_level,
            "profiles": [p.shapes for p in config.profiles],
            "timing_cache_entries_in": len(config.timing_cache.entries) if config.timing_cache else None,
        }
        trt.builds.append(record)
        if trt.fail_builds:
            self.logger.log(Severity.ERROR, "fake: out of memory while building (asked by the test)")
            return None
        if strongly and fp16_flag:
            self.logger.log(Severity.ERROR, "BuilderFlag::kFP16 is not allowed with a strongly typed network")
            return None
        if len(config.profiles) != 1 or {t.name for t in network.inputs} != set(config.profiles[0].shapes):
            self.logger.log(Severity.ERROR, "network has dynamic inputs but no matching optimization profile")
            return None
        if config.timing_cache is not None:
            config.timing_cache.entries.append(record["onnx_sha256"][:12])
        header = {
            "version": trt.__version__, "fp16_flag": fp16_flag,
            "inputs": [[t.name, list(t.shape), int(t.dtype)] for t in network.inputs],
            "outputs": [[t.name, list(t.shape), int(t.dtype)] for t in network.outputs],
            "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
        }
        return PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network.onnx


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, header: dict[str, Any], onnx: bytes) -> None:
        self._trt = trt
        self.header, self.onnx = header, onnx
        self.fp16_flag = bool(header["fp16_flag"])
        self.tensors: dict[str, tuple[TensorIOMode, tuple[int, ...], DataType]] = {}
        for name, shape, dt in header["inputs"]:
            self.tensors[name] = (TensorIOMode.INPUT, tuple(shape), DataType(dt))
        for name, shape, dt in header["outputs"]:
            self.tensors[name] = (TensorIOMode.OUTPUT, tuple(shape), DataType(dt))
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in header["profile"].items()}
        self._session: Any = None

    @property
    def session(self) -> Any:
        if self._session is None:
            self._session = _ort_session(self.onnx)
        return self._session

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensors[name][0] if name in self.tensors else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensors[name][2]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if profile_index != 0 or name not in self.profile:
            raise RuntimeError(f"no profile {profile_index} for tensor {name!r}")
        return list(self.profile[name])

    def create_execution_context(self) -> FakeExecutionContext:
        return FakeExecutionContext(self._trt, self)


class FakeExecutionContext:
    def __init__(self, trt: FakeTensorRT, engine: FakeEngine) -> None:
        self._trt, self.engine = trt, engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls: list[tuple[int, ...]] = []

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        self.shape_calls.append(shape)
        lo, _opt, hi = self.engine.profile[name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, shape, _dt = self.engine.tensors[name]
        if mode == TensorIOMode.INPUT:
            return self.shapes.get(name, shape)
        batch = next(iter(self.shapes.values()), (-1,))[0]
        return (batch, *shape[1:])

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.tensors:
            return False
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        trt = self._trt
        if trt.fail_execute:
            return False
        if set(self.addresses) != set(self.engine.tensors) or len(self.shapes) != sum(
                1 for m, _s, _d in self.engine.tensors.values() if m == TensorIOMode.INPUT):
            return False
        bindings = {n: (self.addresses[n], self.get_tensor_shape(n), _NP[self.engine.tensors[n][2]])
                    for n in self.engine.tensors}
        trt.executions += 1
        return trt.executor.enqueue(self.engine, bindings, stream_handle)


class FakeRuntime:
    def __init__(self, trt: FakeTensorRT, logger: ILogger) -> None:
        self._trt, self.logger = trt, logger

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        data = bytes(data)
        self._trt.deserializations += 1
        if not data.startswith(PLAN_MAGIC):
            self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: magic tag does not match")
            return None
        head, _, onnx = data[len(PLAN_MAGIC):].partition(b"\n")
        try:
            header = json.loads(head)
        except json.JSONDecodeError:
            self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: corrupt plan")
            return None
        if header.get("version") != self._trt.__version__:
            self.logger.log(Severity.ERROR, "the plan was built by another TensorRT version")
            return None
        return FakeEngine(self._trt, header, onnx)


class HostExecutor:
    """Runs a fake engine on the fake device memory, in stream order, with ONNX Runtime."""

    def __init__(self, cuda: FakePyCuda) -> None:
        self._state = cuda.state
        self.seen_inputs: list[np.ndarray] = []
        """Every input batch as the engine saw it (padding included)."""
        self.corrupt_output: bool = False
        """Tests set this to make the engine wrong (parity must catch it)."""

    def enqueue(self, engine: FakeEngine, bindings: dict[str, tuple[int, tuple[int, ...], Any]],
                stream_handle: int) -> bool:
        stream = self._state.streams.get(stream_handle)
        if stream is None:
            return False

        def op() -> None:
            feeds = {}
            for i in engine.session.get_inputs():
                address, shape, dtype = bindings[i.name]
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                x = np.frombuffer(self._state.device_view(address, nbytes), dtype).reshape(shape).copy()
                self.seen_inputs.append(x)
                if engine.fp16_flag:
                    x = x.astype(np.float16).astype(dtype)
                feeds[i.name] = x
            for o, y in zip(engine.session.get_outputs(), engine.session.run(None, feeds), strict=True):
                address, shape, dtype = bindings[o.name]
                y = np.asarray(y)
                if engine.fp16_flag:
                    y = y.astype(np.float16)
                if self.corrupt_output:
                    y = y[:, ::-1]  # classes in the wrong order
                y = np.ascontiguousarray(y.astype(dtype))
                assert y.shape == tuple(shape), (y.shape, shape)
                self._state.device_view(address, y.nbytes)[:] = y.tobytes()

        stream.enqueue(op)
        return True


class FakeTensorRT(types.ModuleType):
    """TEST DOUBLE of the `tensorrt` module, version 10.x or 11.x (``version``)."""

    def __init__(self, version: str = "10.9.0.34", cuda: FakePyCuda | None = None, executor: Any = None) -> None:
        super().__init__("tensorrt")
        self.__file__ = __file__
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.cuda = cuda
        self.executor = executor if executor is not None else HostExecutor(cuda) if cuda is not None else None
        self.builds: list[dict[str, Any]] = []
        self.executions = 0
        self.deserializations = 0
        self.fail_builds = False
        self.fail_execute = False
        self.ILogger, self.Logger = ILogger, Logger
        self.DataType, self.TensorIOMode, self.MemoryPoolType = DataType, TensorIOMode, MemoryPoolType
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        self.BuilderFlag = BuilderFlag10 if self.major < 11 else BuilderFlag11
        trt = self
        self.Builder = lambda logger: FakeBuilder(trt, logger)
        self.Runtime = lambda logger: FakeRuntime(trt, logger)
        self.OnnxParser = FakeOnnxParser

    @staticmethod
    def nptype(dtype: DataType) -> type:
        return _NP[DataType(dtype)]

    def install(self, monkeypatch: Any) -> FakeTensorRT:
        monkeypatch.setitem(sys.modules, "tensorrt", self)
        return self


def install_fakes(monkeypatch: Any, version: str = "10.9.0.34", **cuda_state: Any) -> tuple[FakeTensorRT, FakePyCuda]:
    """Put a FakeTensorRT of ``version`` and a FakePyCuda into sys.modules (undone after the test)."""
    cuda = FakePyCuda(**cuda_state).install(monkeypatch)
    trt = FakeTensorRT(version, cuda).install(monkeypatch)
    return trt, cuda


def fp16_model(model: Any, keep_io_types: bool = True) -> Any:
    """An fp16 copy of a test ONNX model: float initialisers in float16 and, with
    ``keep_io_types``, float32 inputs/outputs cast at the edges (as the export's conversion
    leaves them); without it the graph's inputs and outputs are float16 too."""
    import copy

    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    if not keep_io_types:
        for value in [*g.input, *g.output]:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
        return m
    nodes = list(g.node)
    for value in g.input:
        for node in nodes:
            node.input[:] = [f"{n}_fp16" if n == value.name else n for n in node.input]
        nodes.insert(0, helper.make_node("Cast", [value.name], [f"{value.name}_fp16"], to=TensorProto.FLOAT16))
    for value in g.output:
        for node in nodes:
            node.output[:] = [f"{n}_fp16" if n == value.name else n for n in node.output]
        nodes.append(helper.make_node("Cast", [f"{value.name}_fp16"], [value.name], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    return m


def add_fp16_variants(models_dir: Path, keep_io_types: bool = True) -> Path:
    """Give every model of a test manifest (tests/onnx_models.write_models) an fp16 ONNX variant
    (see :func:`fp16_model`) and record it in the manifest."""
    import onnx

    manifest_path = Path(models_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["models"].values():
        src = Path(models_dir) / entry["file"]
        dst = src.with_name(src.stem + ".fp16.onnx")
        model = fp16_model(onnx.load(src), keep_io_types)
        onnx.checker.check_model(model)
        onnx.save(model, dst)
        entry["fp16_file"] = dst.name
        entry["fp16_sha256"] = hashlib.sha256(dst.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return Path(models_dir)
