"""The grader's side of a student's kernel: run the notebook there, then call its functions.

`StudentKernel` runs a notebook in a Jupyter kernel of its own (started through
``_grader_launch.py``, in a new process group, working in the notebook's private folder, its
output discarded), then starts the server of ``_grader_kernel.py`` in it and connects. `proxy`
gives a callable that the exercise checks use like the student's function: each call sends the
arguments as plain data, waits at most the check's time limit (then kills the kernel: no signal
inside the grader is needed), and returns what came back decoded to plain values. A cell that
runs past the cell timeout or kills the kernel is skipped when the notebook is run again, so it
costs its time once.
"""

from __future__ import annotations

import copy
import hmac
import itertools
import linecache
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loralab.exercises import _feedback
from loralab.exercises import _grader_kernel as wire

_LAUNCHER = Path(__file__).with_name("_grader_launch.py")
_SERVER_SOURCE = Path(__file__).with_name("_grader_kernel.py").read_text(encoding="utf-8")
#: Seconds a call may take on top of the check's time limit (sending the arrays both ways).
MARGIN = 1.0


class WorkerGone(BaseException):
    """The student's kernel ended during a call: ``why`` says how, for the student's message.

    A BaseException, so that the check (which turns an ``Exception`` into a verdict) lets it
    through to the grader, which writes the verdict itself and starts a new kernel.
    """

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _kernel_manager_class():
    from jupyter_client.manager import AsyncKernelManager

    class LaunchingKernelManager(AsyncKernelManager):
        memory_mb = 0

        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            return [sys.executable, str(_LAUNCHER), str(self.memory_mb), *cmd]

    return LaunchingKernelManager


class StudentKernel:
    """One notebook's kernel, run again (without the cells that hung or crashed) when it ends."""

    def __init__(self, nb, folder: Path, *, cell_seconds: int, memory_mb: int):
        self.source_nb = nb
        self.folder = folder
        self.cell_seconds = cell_seconds
        self.memory_mb = memory_mb
        self.private = Path(tempfile.mkdtemp(prefix="loralab-grader-"))
        self.marker = secrets.token_hex(8)  # in the kernel's environment: finds what it started
        self.skipped: dict[int, str] = {}
        self.executed = None
        self.functions: dict[str, dict] = {}
        self._runs = itertools.count()
        self._client = None
        self._process = None
        self._sock = None
        self.dead: BaseException | None = None
        self.last_call: str | None = None

    # -- running the notebook -------------------------------------------------------------
    def start(self, names: list[str]) -> None:
        """Run the notebook (skipping the cells that hung or crashed before) and connect."""
        self.dead = None
        for _ in range(len(self.source_nb.cells) + 1):
            nb = copy.deepcopy(self.source_nb)
            bad = self._run_cells(nb)
            self._merge_outputs(nb)
            if bad is None:
                self._connect(names)
                return
            index, why = bad
            self.skipped[index] = why
            self.kill()
        raise WorkerGone("the notebook could not be run")  # pragma: no cover - every cell skipped

    def _merge_outputs(self, nb) -> None:
        if self.executed is None:
            self.executed = nb
            return
        for old, new in zip(self.executed.cells, nb.cells, strict=True):
            if old.cell_type == "code" and not old.get("outputs") and new.get("outputs"):
                old.outputs = new.outputs
                old.execution_count = new.execution_count

    def _run_cells(self, nb):
        from nbclient import NotebookClient
        from nbclient.exceptions import CellTimeoutError, DeadKernelError

        run = next(self._runs)
        km = _kernel_manager_class()(kernel_name="python3")
        km.memory_mb = self.memory_mb
        km.connection_file = str(self.private / f"kernel-{run}.json")
        if os.name == "posix":  # no TCP port, and no "without encryption" warning
            km.transport = "ipc"
            km.ip = str(self.private / f"ipc-{run}")
        client = NotebookClient(
            nb,
            km=km,
            timeout=self.cell_seconds,
            kernel_name="python3",
            allow_errors=True,
            interrupt_on_timeout=False,
            resources={"metadata": {"path": str(self.folder)}},
        )
        self._client = client
        env = dict(os.environ, LORALAB_GRADE_RUN=self.marker)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        env.pop("JPY_PARENT_PID", None)
        with client.setup_kernel(env=env):
            self._process = getattr(km.provisioner, "process", None)
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code" or index in self.skipped:
                    continue
                if run > 0 and "check" in cell.metadata.get("tags", []):
                    continue  # a check cell only prints; its output was kept from the first run
                try:
                    client.execute_cell(cell, index)
                except CellTimeoutError:
                    return index, "timeout"
                except DeadKernelError:
                    return index, "died"
        return None

    def _connect(self, names: list[str]) -> None:
        token = secrets.token_hex(16)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            code = (
                f"exec(compile({_SERVER_SOURCE!r}, '<loralab-grader>', 'exec'), "
                "__loralab_grader := {'__name__': '_loralab_grader'})\n"
                f"__loralab_grader['serve']({port}, {token!r}, globals())"
            )
            self._client.kc.execute(code, silent=True, store_history=False)
            deadline = time.monotonic() + 60
            while True:
                listener.settimeout(0.2)
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    if self._process is not None and self._process.poll() is not None:
                        raise WorkerGone(self._exit_reason()) from None
                    if time.monotonic() > deadline:
                        raise WorkerGone("did not start the grading within 60 s") from None
                    continue
                sock.settimeout(10)
                try:
                    hello = wire.recv_message(sock)
                except (EOFError, OSError, ValueError):
                    sock.close()
                    continue
                if hmac.compare_digest(str(hello.get("token", "")), token):
                    break
                sock.close()  # someone else's connection
        self._sock = sock
        reply = self._exchange({"op": "describe", "names": names}, 30)
        self.functions = reply.get("functions", {}) if isinstance(reply, dict) else {}

    # -- ending it ------------------------------------------------------------------------
    def kill(self) -> None:
        """End the kernel and every process in its group now."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        process, self._process = self._process, None
        if process is not None and os.name == "posix":
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the launcher leads the group
            except (ProcessLookupError, PermissionError):
                pass
        client, self._client = self._client, None
        if client is not None:
            try:
                client._cleanup_kernel()  # stop channels; the kernel is gone already
            except Exception:  # noqa: BLE001 - a dead kernel may fail to shut down politely
                pass
        if process is not None:
            try:
                process.kill()
                process.wait(5)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        """Kill the kernel, every process that carries this notebook's marker, the files."""
        self.kill()
        _kill_marked(self.marker)
        for path in self.private.iterdir():
            path.unlink(missing_ok=True)
        self.private.rmdir()

    # -- calling the student's functions -------------------------------------------------
    def _exit_reason(self) -> str:
        process = self._process
        code = None
        if process is not None:
            try:
                code = process.wait(3)
            except Exception:  # noqa: BLE001 - still running: it stopped answering
                code = None
        if code is None:
            return "stopped answering (its connection to the grader closed)"
        if code >= 128:
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            if name == "SIGKILL":
                return "was killed (SIGKILL: the system may have run out of memory)"
            return f"crashed ({name})"
        if code < 0:
            return "lost the process that started it (it was killed)"
        return f"exited with code {code} (`os._exit({code})`, or a library that exits)"

    def _recv(self, deadline: float, limit: float):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                self.dead = _feedback._TimeUp()
                raise self.dead
            self._sock.settimeout(left)
            try:
                return wire.recv_message(self._sock)
            except TimeoutError:
                continue
            except ValueError as exc:  # too large, or not what the server sends
                self.kill()
                self.dead = WorkerGone(f"sent back something the grader cannot read ({exc})")
                raise self.dead from None
            except (EOFError, OSError):
                why = self._exit_reason()
                self.kill()
                self.dead = WorkerGone(why)
                raise self.dead from None

    def _exchange(self, request: dict, limit: float, callables=()):
        if self.dead is not None:
            raise self.dead
        if self._sock is None:
            raise WorkerGone("is not running")
        try:
            wire.send_message(self._sock, request)
        except OSError:
            why = self._exit_reason()
            self.kill()
            self.dead = WorkerGone(why)
            raise self.dead from None
        deadline = time.monotonic() + limit + MARGIN
        while True:
            reply = self._recv(deadline, limit)
            if reply.get("op") != "callback":
                return reply
            wire.send_message(self._sock, _run_callback(reply, callables))

    def check_here(self, check: str, functions: list[str], limit: float) -> dict:
        """Run ``check`` in the kernel (for an exercise that cannot be isolated)."""
        request = {"op": "check", "check": check, "functions": functions, "limit": limit}
        return self._exchange(request, 30 * limit)

    def call(self, name: str, args: tuple):
        """``name(*args)`` in the kernel, within the running check's time limit."""
        limit = _feedback._time_limit.get()
        self.last_call = name
        callables: list = []
        request = {"op": "call", "name": name, "args": [wire.encode(a, callables) for a in args]}
        reply = self._exchange(request, limit, callables)
        if "error" in reply:
            _raise_student_error(reply["error"], self.memory_mb)
        try:
            value = wire.decode(reply.get("value"))
            for index, state in reply.get("rngs", []):
                if isinstance(args[index], np.random.Generator):
                    args[index].bit_generator.state = wire.decode(state["state"])
            for index, new in reply.get("changed", []):
                _update_in_place(args[index], wire.decode(new))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise TypeError(f"what your function returned could not be read: {exc}") from None
        return value

    def proxy(self, name: str):
        """A callable standing for the student's function ``name`` (its name and signature)."""
        return _StudentFunction(self, name, self.functions.get(name, {}).get("params"))


def _student_part(tb):
    """The part of a traceback from the stand-in frame of the student's code on (or None)."""
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<student code"):
        tb = tb.tb_next
    return tb


# The proxy's __call__, compiled under a name that the checks' traceback reader skips (as it
# skips NumPy's and Python's own frames), so that "It happened in ..." names the student's line.
_CALL_SOURCE = """
def __call__(self, *args):
    try:
        return self._kernel.call(self.__name__, args)
    except BaseException as exc:
        raise exc.with_traceback(_student_part(exc.__traceback__))
"""
_namespace = {"_student_part": _student_part}
exec(compile(_CALL_SOURCE, "<frozen loralab grader>", "exec"), _namespace)
_call = _namespace["__call__"]


class _StudentFunction:
    def __init__(self, kernel: StudentKernel, name: str, params):
        import inspect

        self._kernel = kernel
        self.__name__ = self.__qualname__ = name
        try:
            self.__signature__ = inspect.Signature(
                [inspect.Parameter(str(n), inspect._ParameterKind(int(k))) for n, k in params]
            )
        except (TypeError, ValueError):
            self.__signature__ = None

    __call__ = _call


def _run_callback(request: dict, callables) -> dict:
    try:
        fn = callables[int(request["id"])]
        args = [wire.decode(a) for a in request["args"]]
        return {"value": wire.encode(fn(*args))}
    except Exception as exc:  # noqa: BLE001 - the check's own callback refused: tell the student
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def _update_in_place(target, new) -> None:
    """Show the check that the student's function changed an argument (it looks for that)."""
    if isinstance(target, dict) and isinstance(new, dict):
        target.clear()
        target.update(new)
    elif isinstance(target, list) and isinstance(new, list):
        target[:] = new
    elif (
        isinstance(target, np.ndarray) and isinstance(new, np.ndarray) and new.shape == target.shape
    ):
        target.flags.writeable = True
        target[...] = new


_ERROR_TYPES: dict[str, type] = {}


def _error_type(name: str) -> type:
    import builtins

    if name in wire.PLAIN_ERRORS:
        return getattr(builtins, name)
    if name == "LinAlgError":
        return np.linalg.LinAlgError
    name = name if isinstance(name, str) and name.isidentifier() else "Exception"
    if name not in _ERROR_TYPES:
        _ERROR_TYPES[name] = type(name, (Exception,), {})
    return _ERROR_TYPES[name]


def _raise_student_error(error: dict, memory_mb: int):
    kind, message = str(error.get("type")), str(error.get("message", ""))[:2000]
    if kind == "SystemExit":
        exc: BaseException = SystemExit(message)
    elif kind == "MemoryError":
        limit = f" (the limit is {memory_mb} MiB)" if memory_mb else ""
        raise WorkerGone(f"ran out of memory{limit}: MemoryError {message}".rstrip())
    else:
        exc = _error_type(kind)(message)
    frame = error.get("frame")
    if isinstance(frame, list) and len(frame) == 4:
        _raise_at(exc, frame)
    raise exc


_FRAMES = itertools.count()


def _raise_at(exc: BaseException, frame: list):
    """Raise ``exc`` from a stand-in frame with the student's function name, line number and
    line, so that the check's message says where in the student's code it happened."""
    _, lineno, name, line = frame
    lineno = int(lineno) if isinstance(lineno, int) and 0 < lineno < 100_000 else 1
    name = name if isinstance(name, str) and name.isidentifier() else "student_code"
    filename = f"<student code {next(_FRAMES)}>"
    lines = [""] * (lineno - 1) + [str(line) + "\n"]
    linecache.cache[filename] = (len(str(line)), None, lines, filename)
    namespace: dict = {}
    exec(compile("\n" * (lineno - 1) + f"def {name}(e): raise e\n", filename, "exec"), namespace)
    try:
        namespace[name](exc)
    finally:
        linecache.cache.pop(filename, None) if len(linecache.cache) > 10_000 else None


def _kill_marked(marker: str) -> None:
    """Kill every process whose environment carries ``marker`` (Linux: read from /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    needle = f"LORALAB_GRADE_RUN={marker}".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
