"""The wire between the grader and a student's kernel: plain data both ways, never pickle.

This file is used twice. The grader imports it for `encode`, `decode` and the message framing. Its
source is also sent, as text, to the student's kernel after the notebook ran, where `serve` answers
the grader's requests: call the student's function named in a request with the arguments it
carries, and send back what it returned. It imports nothing from loralab (the notebook may have
replaced any of it) and keeps no secret: what the kernel sends is only ever what the student's
function returned, decoded by the grader into plain Python and NumPy values.

Values on the wire (JSON): None, bool, int, float, str as themselves; everything else a tagged
object: ``{"t": "nd", "dtype", "shape", "data"}`` (a numeric array, bytes in base64), ``list``,
``tuple``, ``set``, ``dict`` (a list of key/value pairs), ``rng`` (a NumPy Generator's bit
generator state: the kernel rebuilds it, the grader's own Generator is set to the state the
student's code left), ``callable`` (a callback that runs in the grader, reached by a round trip),
``opaque`` (anything else the student returned: only its type's name and a short repr travel).
Each message is a 4-byte big-endian length and that many bytes of UTF-8 JSON.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np

#: The largest message either side accepts (bytes).
MAX_MESSAGE = 256 * 2**20
#: Array dtypes that travel: bool, integers, floats, complex.
ARRAY_KINDS = "biufc"
#: Exceptions the grader re-raises as themselves; any other arrives as an Exception of that name.
PLAIN_ERRORS = (
    "ArithmeticError AssertionError AttributeError Exception FloatingPointError IndexError "
    "KeyError LookupError NameError NotImplementedError OverflowError RecursionError "
    "RuntimeError TypeError UnboundLocalError ValueError ZeroDivisionError"
).split()
#: The name of the error a blocked loralab function raises in the kernel during grading.
BLOCKED_ERROR = "LoralabImplementationUsed"


def send_message(sock, message: dict) -> None:
    data = json.dumps(message).encode("utf-8")
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exactly(sock, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_message(sock) -> dict:
    (n,) = struct.unpack(">I", _recv_exactly(sock, 4))
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes is larger than the {MAX_MESSAGE} allowed")
    message = json.loads(_recv_exactly(sock, n).decode("utf-8"))
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message


def encode(value, callables=None):
    """``value`` as plain JSON data (see the module docstring). ``callables``, a list, collects
    the callables met (each sent as its index in the list); without it a callable is opaque."""
    if value is None or type(value) in (bool, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.random.Generator):
        return {"t": "rng", "state": _plain_state(value.bit_generator.state)}
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        try:
            arr = np.array(np.asarray(value), copy=True)  # a subclass arrives as a plain array
        except Exception:
            arr = None
        if arr is not None and arr.dtype.kind in ARRAY_KINDS:
            arr = np.ascontiguousarray(arr)
            data = base64.b64encode(arr.tobytes()).decode("ascii")
            return {"t": "nd", "dtype": arr.dtype.str, "shape": list(arr.shape), "data": data}
    if isinstance(value, dict):
        return {
            "t": "dict",
            "v": [[encode(k, callables), encode(v, callables)] for k, v in value.items()],
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        kind = "list" if isinstance(value, list) else "tuple" if isinstance(value, tuple) else "set"
        return {"t": kind, "v": [encode(v, callables) for v in value]}
    if callable(value) and callables is not None:
        callables.append(value)
        return {"t": "callable", "id": len(callables) - 1}
    try:
        text = repr(value)[:200]
    except Exception:
        text = "?"
    return {"t": "opaque", "type": type(value).__name__, "repr": text}


def _plain_state(state):
    if isinstance(state, dict):
        return {"t": "dict", "v": [[str(k), _plain_state(v)] for k, v in state.items()]}
    if isinstance(state, (int, np.integer)):
        return int(state)
    if isinstance(state, str):
        return state
    raise TypeError(f"a bit generator state holds {type(state).__name__}")


_OPAQUE: dict[str, type] = {}


class Opaque:
    """Something a student's function returned that is not plain data: its type's name and repr."""

    def __init__(self, text: str):
        self._text = text

    def __repr__(self) -> str:
        return self._text


def _opaque_type(name: str) -> type:
    name = name if isinstance(name, str) and name.isidentifier() else "object"
    if name not in _OPAQUE:
        _OPAQUE[name] = type(name, (Opaque,), {})
    return _OPAQUE[name]


def decode(data, make_rng=None, make_callable=None, depth: int = 0):
    """Plain Python and NumPy values from `encode`'s output; anything malformed raises ValueError.

    ``make_rng(state)`` and ``make_callable(id)`` build those two kinds (refused when None).
    """
    if depth > 50:
        raise ValueError("values nested more than 50 deep")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not dict or not isinstance(data.get("t"), str):
        raise ValueError(f"not a value: {type(data).__name__}")
    kind = data["t"]
    if kind == "nd":
        dtype = np.dtype(str(data["dtype"]))
        shape = tuple(int(n) for n in data["shape"])
        if dtype.kind not in ARRAY_KINDS or any(n < 0 for n in shape):
            raise ValueError(f"an array of dtype {dtype} or shape {shape}")
        raw = base64.b64decode(str(data["data"]).encode("ascii"), validate=True)
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        return arr[()] if shape == () else arr
    if kind in ("list", "tuple", "set"):
        items = [decode(v, make_rng, make_callable, depth + 1) for v in data["v"]]
        return items if kind == "list" else tuple(items) if kind == "tuple" else set(items)
    if kind == "dict":
        return {
            decode(k, make_rng, make_callable, depth + 1): decode(
                v, make_rng, make_callable, depth + 1
            )
            for k, v in data["v"]
        }
    if kind == "rng" and make_rng is not None:
        return make_rng(decode(data["state"], depth=depth + 1))
    if kind == "callable" and make_callable is not None:
        return make_callable(int(data["id"]))
    if kind == "opaque":
        return _opaque_type(data.get("type"))(str(data.get("repr", ""))[:200])
    raise ValueError(f"a value of kind {kind!r}")


def rng_from_state(state: dict) -> np.random.Generator:
    """A Generator whose bit generator (one of NumPy's) is in ``state``."""
    name = state.get("bit_generator")
    kinds = {
        "PCG64": np.random.PCG64,
        "PCG64DXSM": np.random.PCG64DXSM,
        "MT19937": np.random.MT19937,
        "Philox": np.random.Philox,
        "SFC64": np.random.SFC64,
    }
    if name not in kinds:
        raise ValueError(f"unknown bit generator {name!r}")
    bits = kinds[name]()
    bits.state = state
    return np.random.Generator(bits)


# ---------------------------------------------------------------------------------------------
# In the student's kernel


def _student_frame(tb):
    """(file, line number, function, source line) of the last frame of the student's code."""
    import sysconfig
    import traceback

    stdlib = sysconfig.get_paths()["stdlib"]
    frames = [
        f
        for f in traceback.extract_tb(tb)
        if "site-packages" not in f.filename
        and not f.filename.startswith((stdlib, "<frozen", "<loralab-grader"))
    ]
    if not frames:
        return None
    f = frames[-1]
    return [f.filename, int(f.lineno or 1), f.name, (f.line or "").strip()[:300]]


def _read_only(value):
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, dict):
        for v in value.values():
            _read_only(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _read_only(v)
    return value


def _blocked_code(qualname: str, module: str):
    message = (
        f"`{module}.{qualname}` is loralab's own implementation. While grading, an exercise "
        "must be your own code (NumPy, not loralab): write the computation yourself."
    )
    source = f"def _blocked(*args, **kwargs):\n    raise type({BLOCKED_ERROR!r}, (Exception,), {{}})({message!r})\n"
    namespace: dict = {}
    exec(compile(source, "<loralab-grader-blocked>", "exec"), namespace)
    return namespace["_blocked"].__code__


_BLOCKED: list = []  # (function, its own code, the blocking code)


def block_loralab(modules) -> None:
    """Make every function and method defined in loralab raise `BLOCKED_ERROR` when called.

    The function objects themselves change (their ``__code__``), so names bound earlier with
    ``from loralab... import f`` are blocked too; data (arrays, constants) stays as it is.
    """
    import types

    seen = set()

    def block(fn, module):
        if not isinstance(fn, types.FunctionType) or id(fn) in seen:
            return
        seen.add(id(fn))
        if not str(getattr(fn, "__module__", "")).startswith("loralab") or fn.__closure__:
            return
        if str(fn.__module__).startswith("loralab.exercises._grader"):
            return
        try:
            original, fn.__code__ = fn.__code__, _blocked_code(fn.__qualname__, fn.__module__)
        except (TypeError, ValueError):
            return
        _BLOCKED.append((fn, original, fn.__code__))

    for module in modules:
        for value in list(vars(module).values()):
            if isinstance(value, type) and str(value.__module__).startswith("loralab"):
                for attr in list(vars(value).values()):
                    block(getattr(attr, "__func__", attr), module)
            else:
                block(value, module)


def _loralab_modules():
    import sys

    return [
        m
        for name, m in list(sys.modules.items())
        if (name == "loralab" or name.startswith("loralab.")) and m is not None
    ]


def _install_import_blocker() -> None:
    """Block loralab modules first imported while grading, too."""
    import importlib.machinery
    import sys

    class _Finder:
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] != "loralab":
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                block_loralab([module])

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(map(_same, a, b))
    return True


def serve(port: int, token: str, namespace: dict) -> None:
    """Answer the grader's requests on 127.0.0.1:``port`` until it goes away (in the kernel)."""
    import copy
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    send_message(sock, {"token": token})
    block_loralab(_loralab_modules())
    _install_import_blocker()

    def callback(index):
        def call(*args):
            send_message(sock, {"op": "callback", "id": index, "args": [encode(a) for a in args]})
            reply = recv_message(sock)
            if "error" in reply:
                kinds = {"TypeError": TypeError, "ValueError": ValueError}
                raise kinds.get(reply["error"]["type"], RuntimeError)(reply["error"]["message"])
            return decode(reply["value"])

        return call

    while True:
        try:
            request = recv_message(sock)
        except (EOFError, OSError):
            return
        if request.get("op") == "describe":
            names = request["names"]
            found = {
                n: {"callable": callable(namespace.get(n)), "params": signature_of(namespace, n)}
                for n in names
            }
            send_message(sock, {"functions": found})
            continue
        if request.get("op") == "check":  # an exercise the grader cannot isolate (see grade.py)
            send_message(sock, _check_here(request, namespace))
            continue
        fn = namespace.get(request["name"])
        try:
            args = [_read_only(decode(a, rng_from_state, callback)) for a in request["args"]]
            before = [copy.deepcopy(a) if isinstance(a, (dict, list)) else None for a in args]
            out = fn(*args)
            reply = {"value": encode(out)}
            rngs = {i: encode(a) for i, a in enumerate(args) if isinstance(a, np.random.Generator)}
            changed = {
                i: encode(a)
                for i, (a, b) in enumerate(zip(args, before))
                if b is not None and not _same(b, a)
            }
            reply.update(rngs=list(rngs.items()), changed=list(changed.items()))
        except BaseException as exc:  # noqa: BLE001 - every way out becomes a message
            error = {
                "type": type(exc).__name__,
                "message": str(exc)[:2000],
                "frame": _student_frame(exc.__traceback__),
            }
            reply = {"error": error}
        try:
            send_message(sock, reply)
        except (TypeError, ValueError) as exc:  # something JSON cannot carry
            send_message(sock, {"error": {"type": "TypeError", "message": str(exc), "frame": None}})


def _check_here(request: dict, namespace: dict) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    try:
        import loralab.exercises as exercises

        fns = [namespace.get(n) for n in request["functions"]]
        for fn, original, _ in _BLOCKED:  # the check itself uses loralab
            fn.__code__ = original
        try:
            with contextlib.redirect_stdout(out):
                check = getattr(exercises, request["check"])
                passed = bool(check(*fns, time_limit=request["limit"]))
        finally:
            for fn, _, blocked in _BLOCKED:
                fn.__code__ = blocked
    except BaseException as exc:  # noqa: BLE001
        passed = False
        out.write(f"The check itself failed: {type(exc).__name__}: {exc}")
    return {"passed": passed, "message": out.getvalue().strip()}


def signature_of(namespace: dict, name: str):
    """[(parameter name, kind), ...] of ``namespace[name]``, or None (in the kernel)."""
    import inspect

    try:
        params = inspect.signature(namespace[name]).parameters.values()
    except Exception:
        return None
    return [[p.name, int(p.kind)] for p in params]
