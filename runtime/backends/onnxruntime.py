"""ONNX Runtime backend (CPU and CUDA execution providers), numpy only.

Two ways to hold weights and buffers; everything else (binding, the cache sets, graph ids) is
the same code:

- **Host path** (CPU, the default there): weights.bin is memory-mapped once and handed to the
  sessions with `SessionOptions.add_initializer` (numpy views: buffers the caller owns, which is
  what that API requires). ONNX Runtime "prepacks" each MatMul weight into a private copy per
  session, so two sessions would hold the weights three times; nothing is captured as a graph
  on CPU, so one session of the prefill graph (which takes S >= 1) runs both phases
  (`decode_graph=True` adds a decode.onnx session: verify checks that graph). Measured on
  qwen2-0.5b fp32 here (1.88 GiB of weights), RSS growth / decode ms at batch 1 and 4: two
  prepacked sessions 5.62 GiB / 66.6 / 84.0; one shared session 3.78 GiB / 66.6 / 81.7; no
  prepacking (`prepack=False`) 1.94 GiB / 75.3 / 174.2. Caches are numpy arrays.
- **Device path** (CUDA; `device_path=True` runs it on CPU, which is how CI tests it): ONNX
  Runtime allocates every buffer on the device (OrtValues, bound by address) and reads the
  weights from weights.bin itself into **one session of the prefill graph that runs both
  phases**, so the device holds one copy. `add_initializer` cannot be used here: it refuses
  buffers ONNX Runtime allocated ("Buffer containing the initializer must be owned by the
  user", onnxruntime_pybind_state.cc; reproduced on CPU), and the Python API has no way to
  hand it device memory the caller owns. The cost: decode runs the prefill graph at S = 1
  (the same ops as decode.onnx, with dynamic shapes), and the decode.onnx graph is for hosts
  and verify only. With `cuda_graph=True` each decode step runs under a `gpu_graph_id` (one per
  window and cache set, inputs at fixed device addresses updated in place) and prefill under
  -1, which disables capture for that run (onnxruntime_run_options_config_keys.h; how
  onnxruntime-genai runs its first, prompt step). GroupQueryAttention's total_sequence_length is
  read on the host, so `ort` graphs take it as the input `total_seq_len` (no device-to-host copy
  in the graph): max(seq_lens) on every run, max_seq_len on a captured decode step (the value is
  baked into the capture; the kernel's per-row lengths come from seq_lens on the device).
  UNVERIFIED: no GPU here, so capture is off by default.
- KV cache: one key and one value buffer per layer, `(max_batch, kv_heads, max_seq_len,
  head_dim)`, allocated once. Every step binds each layer's past and present to the same
  address (IO binding by pointer), so the `ort` target's GroupQueryAttention writes the new
  rows in place. The binding of a (phase, rows, set) is made once and reused; a step rebinds
  only the token inputs. Bundles whose graphs are not in place (`portable`) get a second set of
  buffers: a step reads its rows from one set and writes them (the whole rows) to the other,
  so each row's current set is tracked; before a step over rows that sit in different sets
  (a request prefilled alone, then decoding with the others), the odd rows are copied across.
  The manifest's `cache.in_place` says which kind a bundle is. `copy_row` (a prefilled prefix
  shared by other rows) is a numpy slice assignment on the host path and one run of a small
  Where graph bound to the buffers' addresses on the device path (no trip through the host).
- bfloat16 bundles run on the device path only (CUDA): numpy has no bfloat16, so its buffers
  are allocated and bound by ONNX element type (TensorProto.BFLOAT16), and ONNX Runtime's CPU
  provider has no bfloat16 MatMul.
"""

from __future__ import annotations

import time

import numpy as np

from llmexport import LLMExportError

from ..bundle import NUMPY_DTYPES, Bundle, paths
from ..bundle import names as io
from .base import Backend

BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16: numpy has no such dtype; ONNX Runtime takes the enum
PREFILL, DECODE = io.PREFILL, io.DECODE


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise LLMExportError("onnxruntime is not installed; pip install onnxruntime (CPU) or onnxruntime-gpu") from None
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    def __init__(self, bundle: Bundle, device: str = "cpu", *, cuda_graph: bool = False, prepack: bool = True,
                 decode_graph: bool | None = None, cache_rows: int | None = None, threads: int | None = None,
                 device_path: bool | None = None):
        """device_path: weights and buffers as on a GPU (None: on cuda only; see the module docstring)."""
        super().__init__(bundle, cache_rows, threads)
        self._prepack = prepack
        ort = _ort()
        if device not in ("cpu", "cuda"):
            raise LLMExportError(f"unknown device {device!r}; use cpu or cuda")
        if bundle.dtype == "bfloat16" and device != "cuda":
            raise LLMExportError("ONNX Runtime's CPU provider has no bfloat16 MatMul; run this bundle with --device "
                                 "cuda (onnxruntime-gpu), or re-export with --dtype float16 or float32")
        if device == "cuda" and bundle.target == "ort" and bundle.dtype == "float32":
            raise LLMExportError("ONNX Runtime's CUDA GroupQueryAttention has no float32 kernel; "
                                 "re-export with --dtype float16 for --device cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LLMExportError("device cuda needs onnxruntime-gpu with a visible GPU; "
                                 "pip install onnxruntime-gpu, or use --device cpu")
        self.device = device
        self.device_path = device == "cuda" if device_path is None else device_path
        if self.device_path and decode_graph:
            raise LLMExportError("the device path runs both phases on one session of the prefill graph; "
                                 "decode_graph=True needs the host path (device_path=False, CPU)")
        self.name = f"onnxruntime-{device}"
        self._dtype = NUMPY_DTYPES[bundle.dtype]  # host view (uint16 for bfloat16)
        self._element = BFLOAT16 if bundle.dtype == "bfloat16" else self._dtype  # what ONNX Runtime is told
        self._capture = cuda_graph  # decode captured as CUDA graphs: under a gpu_graph_id, inputs at fixed addresses
        # The host path hands ONNX Runtime views of the memory map; the device path lets it read weights.bin.
        self._weights = {} if self.device_path else ort_weights(bundle)
        self._sessions = {PREFILL: self._session(PREFILL)}
        if decode_graph:
            self._sessions[DECODE] = self._session(DECODE)
        else:  # not run here, but hosts that drive the graphs load it: check it as well
            paths.check_graph(bundle.path, bundle.graph_path(DECODE))
            self._sessions[DECODE] = self._sessions[PREFILL]
        inputs = {phase: {i.name for i in session.get_inputs()} for phase, session in self._sessions.items()}
        self._takes_total = {phase: io.TOTAL_SEQ_LEN in names for phase, names in inputs.items()}
        # the prefill graph takes the positions whose logits it returns; decode.onnx has its one token's
        self._picks = {phase: io.LOGITS_INDEX in names for phase, names in inputs.items()}
        self._kv = bundle.kv
        # One list of buffers per set, in the KV layout's order (kv.py): past and present share
        # one set when the graphs write in place, else a step reads one set and writes the other.
        shape = self._kv.shape(self.cache_rows)
        sets = 1 if self._kv.in_place else 2
        self._caches = [[self._zeros(shape) for _ in range(self._kv.buffers)] for _ in range(sets)]
        self._row_set = np.zeros(self.cache_rows, dtype=np.int64)  # the set holding each row's cache
        self._bindings: dict[tuple, object] = {}
        self._logits = np.empty((self.cache_rows, bundle.vocab_size), np.float32)  # bound by every uncaptured step
        self._captured_inputs: dict[int, dict[str, object]] = {}
        self._copier = None  # the device path's session of copy_row_graph, made on first use
        self._row_bytes = self._kv.row_elements * np.dtype(self._dtype).itemsize  # one row of one buffer

    # -- loading -----------------------------------------------------------------------------

    def _session(self, phase: str):
        return create_session(self.bundle, self._weights, self.bundle.graph_path(phase), device=self.device,
                              threads=self.threads, prepack=self._prepack,
                              cuda_graph=self._capture and self.device == "cuda")

    def _zeros(self, shape):
        if self.device_path:  # ONNX Runtime's allocation on the device, filled once from the host
            value = _ort().OrtValue.ortvalue_from_shape_and_type(shape, self._element, self.device, 0)
            value.update_inplace(np.zeros(shape, dtype=self._dtype))
            return value
        return np.zeros(shape, dtype=self._dtype)

    # -- running -----------------------------------------------------------------------------

    def _address(self, buffer) -> int:
        return buffer.data_ptr() if self.device_path else buffer.ctypes.data

    def cache_addresses(self) -> list[int]:
        return [self._address(b) for caches in self._caches for b in caches]

    def _host(self, buffer) -> np.ndarray:
        if not self.device_path:
            return buffer
        if self._element == BFLOAT16:
            raise LLMExportError("reading bfloat16 caches back to the host is not supported (numpy has no bfloat16)")
        return buffer.numpy()

    def cache_arrays(self, rows: range, length: int | None = None) -> list[np.ndarray]:
        sets = [[self._host(b) for b in caches] for caches in self._caches]
        return [np.concatenate([sets[self._row_set[r]][i][r: r + 1, :, :length] for r in rows])
                for i in range(len(sets[0]))]

    def _settle(self, rows: range) -> int:
        """The set every row of `rows` is in, after copying the rows in the other set across."""
        held = self._row_set[rows.start: rows.stop]
        current = int(np.bincount(held, minlength=2).argmax())
        odd = [row for row in rows if self._row_set[row] != current]
        if odd:
            for src, dst in zip(self._caches[1 - current], self._caches[current]):
                if self.device_path:  # through the host: only portable bundles on a device get here
                    whole = self._host(dst).copy()
                    whole[odd] = self._host(src)[odd]
                    dst.update_inplace(whole)
                else:
                    dst[odd] = src[odd]
            self._row_set[odd] = current
        return current

    def _bind_caches(self, binding, rows: range, current: int) -> None:
        past = self._caches[current]
        present = self._caches[(current + 1) % len(self._caches)]
        shape = self._kv.shape(len(rows))
        offset = rows.start * self._row_bytes
        for name, out_name, src, dst in zip(self._kv.inputs, self._kv.outputs, past, present):
            binding.bind_input(name, self.device, 0, self._element, shape, self._address(src) + offset)
            binding.bind_output(out_name, self.device, 0, self._element, shape, self._address(dst) + offset)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.check_copy_row(src, dst, length)
        if src == dst or not length:
            return
        # from the set holding src's cache into the set holding dst's (two sets: portable bundles)
        sources, targets = self._caches[self._row_set[src]], self._caches[self._row_set[dst]]
        if not self.device_path:
            for a, b in zip(sources, targets):  # (B, H, S, D)
                b[dst, :, :length] = a[src, :, :length]
            return
        # ONNX Runtime's own buffers: one run of a small graph over every buffer, bound by address
        if self._copier is None:
            graph = copy_row_graph(len(sources), self._bytes_shape())
            self._copier = create_session(self.bundle, {}, graph, device=self.device, threads=self.threads)
        binding = self._copier.io_binding()
        shape = self._bytes_shape()
        for i, (a, b) in enumerate(zip(sources, targets)):
            into = self._address(b) + dst * self._row_bytes
            binding.bind_input(f"src_{i}", self.device, 0, np.uint8, shape, self._address(a) + src * self._row_bytes)
            binding.bind_input(f"dst_{i}", self.device, 0, np.uint8, shape, into)
            binding.bind_output(f"out_{i}", self.device, 0, np.uint8, shape, into)
        binding.bind_cpu_input("length", np.array(length, np.int64))
        try:
            self._copier.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime raises untyped errors
            raise LLMExportError(f"onnxruntime failed copying cache row {src} to {dst}: "
                                 f"{str(e).strip().splitlines()[-1]}") from None

    def _bytes_shape(self) -> tuple[int, int, int, int]:
        """One cache row as bytes, (1, H, S, D * itemsize): the copy never needs the dtype."""
        _, heads, slots, dim = self._kv.shape(1)
        return 1, heads, slots, dim * np.dtype(self._dtype).itemsize

    def _bind_tokens(self, binding, captured: bool, input_ids, position_ids, seq_lens, phase: str,
                     logits_at) -> None:
        feeds = {io.INPUT_IDS: input_ids, io.POSITION_IDS: position_ids, io.SEQ_LENS: seq_lens}
        if self._picks[phase]:  # by default each row's last real token
            feeds[io.LOGITS_INDEX] = io.logits_index(seq_lens, position_ids)[:, None] if logits_at is None else logits_at
        if self._takes_total[phase]:  # read on the host; a captured step bakes it: there, the capacity
            total = self.bundle.max_seq_len if captured else int(np.max(seq_lens))
            binding.bind_cpu_input(io.TOTAL_SEQ_LEN, np.array(total, dtype=np.int32))
        if not captured:
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
            return
        # A captured graph replays fixed addresses: the inputs' device buffers are updated in place.
        fixed = self._fixed(input_ids.shape[0])
        for name, array in feeds.items():  # (logits_index: always 0, the one token)
            fixed[name].update_inplace(np.ascontiguousarray(array, dtype=np.int64))
            binding.bind_ortvalue_input(name, fixed[name])

    def _fixed(self, batch: int) -> dict[str, object]:
        """One device buffer per graph input and the logits, per decode batch size, allocated once."""
        if batch not in self._captured_inputs:
            ort = _ort()
            value = lambda shape, dtype: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)  # noqa: E731
            picks = self._picks[DECODE]  # the prefill graph's session runs decode on the device path
            self._captured_inputs[batch] = {io.INPUT_IDS: value((batch, 1), np.int64),
                                         io.POSITION_IDS: value((batch, 1), np.int64),
                                         io.SEQ_LENS: value((batch,), np.int64),
                                         **({io.LOGITS_INDEX: value((batch, 1), np.int64)} if picks else {}),
                                         io.LOGITS: value((batch, *(1,) * picks, self.bundle.vocab_size),
                                                          np.float32)}
        return self._captured_inputs[batch]

    def capture_id(self, rows: range, current: int) -> int:
        """The gpu_graph_id of decode over `rows` from cache set `current`: 1, 2, ... (0 is ONNX
        Runtime's own default id)."""
        return 1 + 2 * (len(rows) * self.cache_rows + rows.start) + current

    def step(self, phase, input_ids, position_ids, seq_lens, rows, copy=True, logits_at=None):
        self.check_step(seq_lens, rows)
        self.check_logits_at(phase, input_ids, logits_at)
        ort = _ort()
        current = self._settle(rows) if len(self._caches) == 2 else 0
        captured = self._capture and phase == DECODE
        picked = logits_at is not None
        key = (phase, rows.start, len(rows), current, picked)
        binding = self._bindings.get(key)
        vocab = self.bundle.vocab_size
        if binding is None:  # made once per key: later steps rebind only the token inputs
            binding = self._bindings[key] = self._sessions[phase].io_binding()
            if captured:  # bound first: output 0
                binding.bind_ortvalue_output(io.LOGITS, self._fixed(len(rows))[io.LOGITS])
            elif not picked:  # the first len(rows) rows of one host buffer: no allocation per run
                shape = (len(rows), *(1,) * self._picks[phase], vocab)
                binding.bind_output(io.LOGITS, "cpu", 0, np.float32, shape, self._logits.ctypes.data)
            self._bind_caches(binding, rows, current)
        if picked:  # a fresh (B, K, V) array per run: its size changes with K, and the caller keeps it
            out = np.empty((len(rows), logits_at.shape[1], vocab), np.float32)
            binding.bind_output(io.LOGITS, "cpu", 0, np.float32, out.shape, out.ctypes.data)
        self._bind_tokens(binding, captured, input_ids, position_ids, seq_lens, phase, logits_at)
        options = ort.RunOptions()
        if self._capture:  # one captured graph per (window, cache set), each with its own fixed addresses;
            # -1: this run is not captured (prefill shares the session on the device path)
            options.add_run_config_entry("gpu_graph_id", str(self.capture_id(rows, current) if captured else -1))
        started = time.perf_counter()
        try:
            self._sessions[phase].run_with_iobinding(binding, options)
        except Exception as e:  # onnxruntime raises untyped errors
            raise LLMExportError(f"onnxruntime failed running {phase}: {str(e).strip().splitlines()[-1]}") from None
        finally:
            self.run_s += time.perf_counter() - started
        if len(self._caches) == 2:
            self._row_set[rows.start: rows.stop] = 1 - current
        if picked:
            return out
        # logits only (the caches stay where they are); every binding writes the same buffer
        logits = self._logits[: len(rows)] if not captured else binding.get_outputs()[0].numpy().reshape(len(rows), vocab)
        return logits.copy() if copy else logits

    def close(self) -> None:
        self._copier = None
        self._bindings.clear()
        self._sessions.clear()
        self._caches.clear()
        self._weights.clear()


def copy_row_graph(buffers: int, shape: tuple[int, int, int, int]) -> bytes:
    """The graph behind the device path's copy_row: out_i = Where(slot < length, src_i, dst_i) for
    `buffers` rows of `shape` (1, H, S, bytes per slot) and an int64 scalar `length`. Each out_i is
    bound to dst_i's own memory: elementwise, so writing in place is safe; bytes, so one graph
    serves every dtype (bfloat16 included)."""
    from onnx import TensorProto, helper, numpy_helper

    slot = numpy_helper.from_array(np.arange(shape[2], dtype=np.int64).reshape(1, 1, -1, 1), "slot")
    nodes = [helper.make_node("Less", ["slot", "length"], ["keep"])]
    inputs = [helper.make_tensor_value_info("length", TensorProto.INT64, [])]
    outputs = []
    for i in range(buffers):
        nodes.append(helper.make_node("Where", ["keep", f"src_{i}", f"dst_{i}"], [f"out_{i}"]))
        inputs += [helper.make_tensor_value_info(f"{name}_{i}", TensorProto.UINT8, shape) for name in ("src", "dst")]
        outputs.append(helper.make_tensor_value_info(f"out_{i}", TensorProto.UINT8, shape))
    graph = helper.make_graph(nodes, "copy_row", inputs, outputs, [slot])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def ort_weights(bundle: Bundle) -> dict[str, object]:
    """OrtValues of every weight for `add_initializer`: views of the bundle's memory map (buffers
    the caller owns; the Bundle keeps the map alive)."""
    ort = _ort()
    return {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in bundle.weights.items()}


def create_session(bundle: Bundle, weights: dict[str, object], graph, *, device: str = "cpu",
                   threads: int | None = None, prepack: bool = True, cuda_graph: bool = False):
    """An InferenceSession of `graph` (a path inside the bundle, or serialized model bytes whose
    external data refers to the bundle's weight file) with `weights` (OrtValues by initializer
    name) handed over instead of read from disk."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if isinstance(graph, bytes):  # external data paths resolve against the bundle, not the cwd
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(bundle.path.resolve()))
    for name, value in weights.items():
        options.add_initializer(name, value)
    if device == "cuda":
        cuda = {"device_id": "0", "enable_cuda_graph": "1" if cuda_graph else "0"}
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    where = "a modified copy of a graph" if isinstance(graph, bytes) else str(graph)
    if not isinstance(graph, bytes):  # every external-data path inside the bundle, before ORT reads any
        paths.check_graph(bundle.path, graph)
    try:
        return ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise session_error(e, where, device) from None


# ONNX Runtime's exception classes (onnxruntime.capi.onnxruntime_pybind11_state) whose cause is the
# file itself; any other failure (a missing kernel, a provider or device problem, an argument this
# code passed) is not cured by re-exporting, so it is reported for what it is.
_FILE_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NoModel")


def session_error(error: Exception, where: str, device: str) -> LLMExportError:
    """The one-line error for an InferenceSession that could not be created."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    kind = type(error).__name__
    if kind in _FILE_ERRORS:
        return LLMExportError(f"cannot load {where}: {first}; the file is corrupt, re-export the bundle")
    if kind == "NotImplemented":
        return LLMExportError(f"ONNX Runtime {_ort().__version__} has no {device} kernel for an op of {where}: "
                              f"{first}; upgrade onnxruntime, or export for another --target/--dtype")
    if kind == "EPFail" or device != "cpu":
        return LLMExportError(f"ONNX Runtime could not set up {where} on {device} ({kind}): {first}; check the "
                              f"GPU, its driver and the CUDA/cuDNN versions onnxruntime-gpu needs")
    return LLMExportError(f"ONNX Runtime could not create a session for {where} ({kind}): {first}")
