"""The C API (runtime/llmexport.h): the marshalling layer and the builder of libllmexport.so.

Mechanism: cffi's embedding mode. `build_library` compiles a shared library whose exported
functions start CPython on first use and call the methods of CApi below (`install` registers
them), which marshal C arguments onto runtime.session.Session. The generation loop and KV buffers are the runtime's
own. Why cffi: it is a maintained, documented way to export plain C symbols from Python with
no hand-written CPython API code, the GIL is taken per call (so sessions in different threads
are safe), and the header stays free of Python types.
"""

from __future__ import annotations

import itertools
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import llmexport
from llmexport import LLMExportError
from llmexport.runtime import defaults

if TYPE_CHECKING:  # imported when the first session opens, inside the embedded interpreter
    from llmexport.runtime.session import Session

HEADER = Path(__file__).with_name("llmexport.h")
MODULE = "_llmexport_capi"
OK, INVALID_ARGUMENT, BUNDLE, LIMIT, INTERNAL = 0, 1, 2, 3, 4
# llmx_sampling_init writes exactly these fields, forever (the first published layout); fields
# added later are filled only by llmx_sampling_init_size, which is told the caller's size.
SAMPLING_V0 = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "ignore_eos")
MAX_STRUCT_SIZE = 64 * 1024


def fields_within(ffi, ctype: str, size: int) -> list[str]:
    """Fields of struct `ctype` (after struct_size) that lie entirely in its first `size` bytes:
    what a caller compiled against an older, smaller layout really has."""
    return [name for name, field in ffi.typeof(ctype).fields[1:]
            if field.offset + ffi.sizeof(field.type) <= size]


def check_struct_size(ffi, ctype: str, size: int) -> None:
    first = ffi.typeof(ctype).fields[1][1]
    if not first.offset + ffi.sizeof(first.type) <= size <= MAX_STRUCT_SIZE:
        raise LLMExportError(f"{ctype}.struct_size={size} is not a struct size; set it with {ctype}_init_size"
                             f"(p, sizeof *p)")


def declarations() -> str:
    """The plain C declarations between the header's markers (what cffi reads)."""
    text = HEADER.read_text()
    start = text.index("/* BEGIN DECLARATIONS")
    start = text.index("*/", start) + 2
    return text[start: text.index("/* END DECLARATIONS */")]


# -- the marshalling layer, run inside the embedded interpreter -------------------------------

# The exported functions (runtime/llmexport.h), each a method of CApi of the same name. Guarded
# ones report exceptions as status codes and the message through llmx_last_error.
PLAIN = ("llmx_version", "llmx_last_error", "llmx_sampling_init", "llmx_sampling_init_size",
         "llmx_open_options_init_size", "llmx_free_string")
GUARDED = ("llmx_open", "llmx_open_ex", "llmx_close", "llmx_generate", "llmx_generate_text")


def install(ffi, lib) -> None:
    """Register every exported function with cffi (called once by the embedded interpreter)."""
    api = CApi(ffi, lib)
    for name in PLAIN:
        ffi.def_extern(name=name)(getattr(api, name))
    for name in GUARDED:
        ffi.def_extern(name=name, error=INTERNAL)(api.guarded(getattr(api, name)))


class CApi:
    """The state behind the C functions: open sessions by handle (each with its running calls)
    and the calling thread's last error."""

    def __init__(self, ffi, lib):
        self.ffi, self.lib = ffi, lib
        self.sessions: dict[int, tuple[Session, Users]] = {}
        self.ids = itertools.count(1)
        self.local = threading.local()
        self.version = ffi.new("char[]", llmexport.__version__.encode())
        self.empty = ffi.new("char[]", b"")

    # -- marshalling helpers --------------------------------------------------------------------

    def fail(self, code: int, message: str) -> int:
        self.local.error = self.ffi.new("char[]", message.encode("utf-8", "replace"))
        return code

    def guarded(self, fn):
        """Exceptions become status codes; nothing escapes into C."""
        def wrapper(*args):
            self.local.error = self.empty
            try:
                return fn(*args)
            except LLMExportError as e:
                return self.fail(INVALID_ARGUMENT, str(e))
            except Exception as e:  # a bug of ours: report it, never crash the host
                return self.fail(INTERNAL, f"{type(e).__name__}: {e}")
        wrapper.__name__ = fn.__name__
        return wrapper

    def text(self, p, default: str | None = None) -> str | None:
        return default if p == self.ffi.NULL else self.ffi.string(p).decode("utf-8")

    def owned_string(self, s: str):
        """A malloc'ed copy the caller frees with llmx_free_string."""
        data = s.encode("utf-8", "replace") + b"\0"
        buf = self.ffi.cast("char *", self.lib.malloc(len(data)))
        self.ffi.memmove(buf, data, len(data))
        return buf

    def lookup(self, handle) -> tuple[Session, Users] | None:
        return self.sessions.get(int(self.ffi.cast("uintptr_t", handle)))

    def given(self, params, ctype: str) -> dict:
        """The fields the caller's struct really has (per its struct_size), by name."""
        check_struct_size(self.ffi, ctype, params.struct_size)
        return {name: getattr(params, name) for name in fields_within(self.ffi, ctype, params.struct_size)}

    def sampling(self, params):
        from llmexport.runtime.sampling import SamplingParams

        if params == self.ffi.NULL:
            return SamplingParams()
        fields = self.given(params, "llmx_sampling")
        if "ignore_eos" in fields:
            fields["ignore_eos"] = bool(fields["ignore_eos"])
        return SamplingParams(**fields)

    def init(self, ptr, ctype: str, size: int, defaults: dict, only: tuple[str, ...] | None = None) -> None:
        """Write struct_size and the defaults of the fields that fit in `size` bytes."""
        ffi = self.ffi
        if ptr == ffi.NULL or size < ffi.typeof(ctype).fields[0][1].offset + ffi.sizeof("size_t"):
            return
        size = min(size, ffi.sizeof(ctype))
        ptr.struct_size = size
        for name in fields_within(ffi, ctype, size):
            if only is None or name in only:
                setattr(ptr, name, defaults[name])

    @staticmethod
    def sampling_defaults() -> dict:
        from llmexport.runtime.sampling import SamplingParams

        d = SamplingParams()
        return {name: int(v) if isinstance(v, bool) else v for name, v in vars(d).items() if name in SAMPLING_V0}

    def open_session(self, bundle_dir, out, backend=None, device=None, check_integrity=False, threads=0,
                     speculative=None, speculative_tokens=0, draft=None) -> int:
        from llmexport.runtime.session import BACKENDS, Session
        from llmexport.runtime.speculation import SpeculationConfig

        ffi = self.ffi
        if out == ffi.NULL or bundle_dir == ffi.NULL:
            return self.fail(INVALID_ARGUMENT, "llmx_open: bundle_dir and out must not be NULL")
        out[0] = ffi.NULL
        backend_name = self.text(backend or ffi.NULL, "onnxruntime")
        device_name = self.text(device or ffi.NULL, "cpu")
        if backend_name not in BACKENDS or device_name not in ("cpu", "cuda"):
            return self.fail(INVALID_ARGUMENT, f"llmx_open: unknown backend {backend_name!r} or device "
                                               f"{device_name!r}; backends: {', '.join(BACKENDS)}; devices: cpu, cuda")
        if threads < 0:
            return self.fail(INVALID_ARGUMENT, f"llmx_open_options.threads={threads} must be >= 0 (0: default)")
        method = self.text(speculative or ffi.NULL, "") or None
        draft_dir = self.text(draft or ffi.NULL, "") or None
        tokens = speculative_tokens or defaults.SPECULATIVE_TOKENS
        if method is not None or draft_dir is not None:
            try:
                SpeculationConfig(method or "", tokens, draft=draft_dir)
            except LLMExportError as e:
                return self.fail(INVALID_ARGUMENT, f"llmx_open_options: {e}")
        try:
            session = Session(self.text(bundle_dir), backend_name, device_name, threads=threads or None,
                              check_integrity=bool(check_integrity), speculative=method,
                              speculative_tokens=tokens, draft=draft_dir)
        except LLMExportError as e:
            return self.fail(BUNDLE, str(e))
        handle = next(self.ids)
        self.sessions[handle] = (session, Users())
        out[0] = ffi.cast("llmx_session *", handle)
        return OK

    def run(self, handle, prompt, params, callback, user_data):
        """Shared by both generate functions: (status, token ids, finish reason, text)."""
        entry = self.lookup(handle)
        if entry is None:
            return self.fail(INVALID_ARGUMENT, "unknown or closed session"), [], "", ""
        session, users = entry
        sampler = self.sampling(params)
        if len(prompt) > session.bundle.max_seq_len:
            return self.fail(LIMIT, f"prompt of {len(prompt)} tokens exceeds the bundle's max_seq_len="
                                    f"{session.bundle.max_seq_len}"), [], "", ""
        tokens, reason, pieces = [], "", []
        with users:  # concurrent calls on one session share its engine's decode batch
            stream = session.stream([prompt], sampler)
            try:
                for event in stream:
                    tokens.append(event.token_id)
                    pieces.append(event.text)
                    reason = event.finish_reason or reason
                    if callback != self.ffi.NULL:
                        delta = self.ffi.new("char[]", event.text.encode("utf-8", "replace"))
                        if callback(event.token_id, delta, user_data) != 0:
                            reason = "callback"
                            break
            finally:
                stream.close()
        return OK, tokens, reason, "".join(pieces)

    # -- the exported functions -----------------------------------------------------------------

    def llmx_version(self):
        return self.version

    def llmx_last_error(self):
        return getattr(self.local, "error", self.empty)

    def llmx_sampling_init(self, params):
        v0_end = max(f.offset + self.ffi.sizeof(f.type) for n, f in self.ffi.typeof("llmx_sampling").fields
                     if n in SAMPLING_V0)
        self.init(params, "llmx_sampling", v0_end, self.sampling_defaults(), SAMPLING_V0)

    def llmx_sampling_init_size(self, params, size):
        self.init(params, "llmx_sampling", size, self.sampling_defaults())

    def llmx_open_options_init_size(self, options, size):
        fields = {"backend": self.ffi.NULL, "device": self.ffi.NULL, "check_integrity": 0, "threads": 0,
                  "speculative": self.ffi.NULL, "speculative_tokens": 0, "draft": self.ffi.NULL}
        self.init(options, "llmx_open_options", size, fields)

    def llmx_free_string(self, s):
        if s != self.ffi.NULL:
            self.lib.free(s)

    def llmx_open(self, bundle_dir, backend, device, out):
        return self.open_session(bundle_dir, out, backend, device)

    def llmx_open_ex(self, bundle_dir, options, out):
        fields = {} if options == self.ffi.NULL else self.given(options, "llmx_open_options")
        return self.open_session(bundle_dir, out, **fields)

    def llmx_close(self, handle):
        if handle == self.ffi.NULL:
            return OK
        key = int(self.ffi.cast("uintptr_t", handle))
        if key not in self.sessions:
            return self.fail(INVALID_ARGUMENT, "llmx_close: unknown or already closed session")
        session, users = self.sessions.pop(key)
        users.wait_idle()  # calls already running on it finish first
        session.close()
        return OK

    def llmx_generate(self, handle, prompt, prompt_len, params, callback, user_data, out_ids, out_capacity,
                      out_len, finish_reason):
        ffi = self.ffi
        if prompt == ffi.NULL and prompt_len:
            return self.fail(INVALID_ARGUMENT, "llmx_generate: prompt is NULL")
        if out_ids == ffi.NULL and out_capacity:
            return self.fail(INVALID_ARGUMENT, "llmx_generate: out_ids is NULL but out_capacity > 0")
        status, tokens, reason, _ = self.run(handle, [prompt[i] for i in range(prompt_len)], params, callback,
                                             user_data)
        if status != OK:
            return status
        for i, token in enumerate(tokens[:out_capacity]):
            out_ids[i] = token
        if out_len != ffi.NULL:
            out_len[0] = len(tokens)
        if finish_reason != ffi.NULL:
            finish_reason[0] = self.owned_string(reason)
        return OK

    def llmx_generate_text(self, handle, prompt, params, out_text):
        ffi = self.ffi
        if prompt == ffi.NULL or out_text == ffi.NULL:
            return self.fail(INVALID_ARGUMENT, "llmx_generate_text: prompt and out_text must not be NULL")
        out_text[0] = ffi.NULL
        entry = self.lookup(handle)
        if entry is None:
            return self.fail(INVALID_ARGUMENT, "unknown or closed session")
        if entry[0].tokenizer is None:
            return self.fail(INVALID_ARGUMENT, "this bundle has no tokenizer: use llmx_generate with token ids")
        status, _, _, result = self.run(handle, entry[0].tokenizer.encode(self.text(prompt)), params, ffi.NULL,
                                        ffi.NULL)
        if status == OK:
            out_text[0] = self.owned_string(result)
        return status


# -- the builder ---------------------------------------------------------------------------

class Users:
    """Counts the calls running on a session, so llmx_close waits for them."""

    def __init__(self):
        self._count, self._cond = 0, threading.Condition()

    def __enter__(self):
        with self._cond:
            self._count += 1

    def __exit__(self, *exc):
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_idle(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._count == 0)


def build_library(out_dir: str | Path) -> Path:
    """Compile `out_dir/lib/libllmexport.so` and copy the header to `out_dir/include/`."""
    try:
        import cffi
    except ImportError:
        raise LLMExportError('building the C API needs cffi: pip install "llmexport[capi]"') from None
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise LLMExportError(f"{sys.executable} was built without a shared libpython; the C API embeds "
                             f"CPython and needs one (e.g. pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)")
    out = Path(out_dir).resolve()
    (out / "include").mkdir(parents=True, exist_ok=True)
    (out / "lib").mkdir(parents=True, exist_ok=True)
    (out / "include" / HEADER.name).write_text(HEADER.read_text())
    # The embedded interpreter must see this environment's packages (site dirs incl. .pth files).
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    builder = cffi.FFI()
    builder.embedding_api(declarations())
    builder.cdef("void *malloc(size_t); void free(void *);")
    libdir = sysconfig.get_config_var("LIBDIR")
    builder.set_source(MODULE, '#include "llmexport.h"\n#include <stdlib.h>\n', include_dirs=[str(HEADER.parent)],
                       extra_link_args=[f"-Wl,-rpath,{libdir}", "-Wl,-soname,libllmexport.so"])
    builder.embedding_init_code(
        "import site\n"
        f"for d in {site_dirs!r}:\n"
        "    site.addsitedir(d)\n"
        f"from {MODULE} import ffi, lib\n"
        "from llmexport.runtime.capi import install\n"
        "install(ffi, lib)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            built = Path(builder.compile(tmpdir=tmp, target="libllmexport.*", verbose=False))
        except Exception as e:
            raise LLMExportError(f"compiling the C API failed ({e}); it needs a C compiler and Python headers") from None
        target = out / "lib" / "libllmexport.so"
        target.write_bytes(built.read_bytes())
    return target
