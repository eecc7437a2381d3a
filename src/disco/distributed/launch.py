"""Run a function on several real ``torch.distributed`` ranks (gloo on CPU, NCCL on GPUs): the tests' and the
distributed benchmarks' launcher.

Writing a distributed test::

    from disco.distributed.launch import rank_device_type, run_ranks   # tests: ``from dist_harness import run_ranks``

    def _body(rank, world_size, n):          # module level: the ranks import it by name
        import torch.distributed as dist
        t = torch.full((n,), float(rank), device=rank_device_type())
        dist.all_reduce(t)
        return t                             # comes back to the parent, pickled (on the CPU)

    def test_sum():
        out = run_ranks(_body, 4, 3)         # out[r] is rank r's return value
        assert torch.equal(out[0], torch.full((3,), 6.0))

Inside ``_body`` the default process group is initialised (``RANK_THREADS`` torch threads, ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` / ``MASTER_ADDR`` set), so
``init_device_mesh(rank_device_type(), (2, 2))``, ``fully_shard``, ``parallelize_module`` and
``torch.distributed.checkpoint`` work directly.

Device: ``device="auto"`` (the default, or ``DISCO_DEVICE=auto|cpu|cuda`` when the argument is left out) runs the
ranks on CUDA when this machine has at least one GPU per rank, else on the CPU. On CPU the process group is gloo,
as it always was (on a machine with GPUs, CPU ranks get ``CUDA_VISIBLE_DEVICES=""``: what picks a device by
itself, such as ``fully_shard``'s default mesh, picks the CPU too). On CUDA rank ``r`` calls
``torch.cuda.set_device(r)`` and joins a ``"cpu:gloo,cuda:nccl"`` group: CUDA tensors travel over NCCL, CPU
tensors (a body's bookkeeping, a ``"cpu"`` mesh) over gloo, so a body written for the CPU still runs.
``rank_device_type()`` / ``rank_device()`` tell a body which device it got; ``device="cpu"`` pins a call to the
CPU (a test whose oracle is a bit-for-bit CPU reference); ``device="cuda"`` demands one GPU per rank and raises
``ValueError`` otherwise. Tensors a rank returns come back on the CPU.

Rendezvous: by default the ranks meet through a ``FileStore`` in a fresh temporary directory per call (no
ports at all). ``rendezvous="tcp"`` makes the parent host a ``TCPStore`` on a free port (``port=0``) instead
and also sets ``MASTER_PORT``; on this gVisor sandbox a ``TCPStore`` client constructor sometimes stalls for
exactly 5 s when several ranks connect at once (about 1 launch in 10-60), which the file store avoids.

What ``run_ranks`` guarantees:

* return values come back in rank order; tensors are detached and copied to the CPU before pickling (DTensors
  are refused: return ``x.full_tensor()`` or ``x.to_local()``);
* an exception on any rank is raised in the parent as :class:`RankError` whose message holds every failing
  rank's number and full traceback (the first failure's type is in the headline, the original exception is
  the ``__cause__`` when it unpickles); a rank that dies without reporting (segfault, ``os._exit``) counts
  as a failure too;
* if not every rank reports within ``timeout`` seconds (counted from the moment all ranks are started), the
  hung ranks' Python stacks are dumped, every rank and its descendants are killed, and ``TimeoutError``
  names the ranks that did not finish (with their stacks), so a deadlock fails the test instead of hanging
  CI. The ranks' process-group timeout (``pg_timeout``) defaults to ``timeout`` + 30 s, so the launcher, not
  gloo or NCCL, catches a deadlock;
* each rank watches the parent through a pipe and kills itself if the parent dies;
* what a rank prints (stdout and stderr) is replayed on the parent's ``sys.stdout`` (as it is when the call
  returns or raises) with a ``[rank r]`` prefix, so pytest shows it for failing tests.

Processes come from a ``forkserver`` that preloads torch and its distributed modules (plus ``preload``): the
first call pays a few seconds of warm-up, later calls about 0.1-0.3 s. The forkserver is made once per
process; modules a later call's ``preload`` adds are imported in each rank instead. The function must be a
module-level function of an importable module (a test file in ``tests/`` is fine: ``conftest.py`` puts
``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import importlib.util
import io
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICES",
    "DEVICE_ENV",
    "HOST",
    "RANK_THREADS",
    "RankError",
    "backend_for",
    "choose_device",
    "rank_device",
    "rank_device_type",
    "rank_threads",
    "run_ranks",
]

HOST = "127.0.0.1"
#: torch intra-op threads in each rank. A single-process reference that a test compares bit for bit with the
#: ranks must run with as many (``rank_threads()``): MKL's fp32 GEMM rounds differently with another thread count
#: (on 2 threads it splits the inner dimension of 64..128-sized products with ``beta != 0``, as ``addmm`` /
#: ``baddbmm`` in Newton-Schulz are; on AVX2 even plain ``mm``), so a 2-thread parent differs from 1-thread ranks by
#: a few fp32 ulps per product, which Newton-Schulz carries into the update.
RANK_THREADS = 1

#: what ``device=`` (and ``DISCO_DEVICE``) accept: ``auto`` is CUDA where every rank gets its own GPU, else CPU
DEVICES = ("auto", "cpu", "cuda")
#: the environment variable that picks the device when a call leaves ``device`` out (tests, ``make bench``)
DEVICE_ENV = "DISCO_DEVICE"
# The process-group backend per device: on CUDA, CPU tensors still go over gloo (a body's bookkeeping, CPU meshes).
_BACKENDS = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl"}

# What the forkserver imports once, before it forks any rank (``preload`` adds to it).
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp"]
_PRELOAD += ["torch.distributed.tensor.parallel", "torch.distributed.checkpoint"]

# After the first failure, how long the other ranks get to report before they are killed.
_FAILURE_GRACE_S = 10.0
# After every rank reported, how long they get to exit.
_EXIT_GRACE_S = 15.0
# Log tail shown for a rank in an error message.
_LOG_TAIL = 4000

FnSpec = tuple[str, str, "str | None"]
Status = tuple[Any, ...]  # ("ok", result bytes) | ("err", type name, traceback, exception bytes) | ("died", code)

_ctx_lock = threading.Lock()
_ctx: ForkServerContext | None = None
_preloaded: frozenset[str] = frozenset()
_rank_device_type = "cpu"  # set in each rank by ``_rank_entry``


class RankError(RuntimeError):
    """One or more ranks raised (or died). ``failures`` maps rank -> formatted traceback / reason."""

    def __init__(self, message: str, failures: dict[int, str], exc_types: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures
        self.exc_types = exc_types


def choose_device(world_size: int, device: str | None = None, *, name: str = "device") -> str:
    """The device ``world_size`` ranks run on: ``"cpu"`` or ``"cuda"``.

    ``device``: ``"auto"``, ``"cpu"`` or ``"cuda"``; ``None`` reads ``DISCO_DEVICE`` (unset or empty: ``"auto"``).
    ``"auto"`` is ``"cuda"`` when CUDA and NCCL are available with at least ``world_size`` devices (NCCL wants one
    GPU per rank), else ``"cpu"``. ``"cuda"`` without enough GPUs raises ``ValueError``, as does an unknown value; the
    message names the variable, or ``name`` (the argument's name to the caller: ``--device`` for a CLI).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    source = name
    if device is None:
        device, source = os.environ.get(DEVICE_ENV) or "auto", DEVICE_ENV
    if device not in DEVICES:
        raise ValueError(f"{source}={device!r} is not a device of the launcher; valid: {list(DEVICES)}")
    if device == "cpu":
        return "cpu"
    import torch

    available = _cuda_available()
    count = int(torch.cuda.device_count()) if available else 0
    nccl = available and _nccl_available()
    if nccl and count >= world_size:
        return "cuda"
    if device == "cuda":
        seen = "CUDA is not available" if not available else "NCCL is not available" if not nccl else ""
        seen = seen or f"{count} CUDA device(s)"
        raise ValueError(f"{source}='cuda' needs one CUDA device per rank: {world_size} ranks, {seen}")
    return "cpu"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _nccl_available() -> bool:
    import torch.distributed as dist

    return bool(dist.is_nccl_available())


def backend_for(device: str) -> str:
    """The ``init_process_group`` backend of ranks on ``device`` (``"cpu"``: gloo; ``"cuda"``: NCCL for CUDA
    tensors and gloo for CPU ones)."""
    if device not in _BACKENDS:
        raise ValueError(f"device must be one of {sorted(_BACKENDS)}, got {device!r}")
    return _BACKENDS[device]


def rank_device_type() -> str:
    """Inside a rank of :func:`run_ranks`: ``"cuda"`` or ``"cpu"``, the device the launcher gave it (the first
    argument of ``init_device_mesh``). Outside a rank: ``"cpu"``."""
    return _rank_device_type


def rank_device() -> torch.device:
    """Inside a rank: its ``torch.device`` (``cuda:<local rank>`` on CUDA, else ``cpu``); outside a rank: ``cpu``."""
    import torch

    if _rank_device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _context(preload: Sequence[str]) -> tuple[ForkServerContext, list[str]]:
    """The process's forkserver context (made on first use) and the modules of ``preload`` it did not preload."""
    global _ctx, _preloaded
    wanted = list(dict.fromkeys([*_PRELOAD, *preload]))
    with _ctx_lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(wanted)
            _ctx, _preloaded = ctx, frozenset(wanted)
        return _ctx, [m for m in wanted if m not in _preloaded]


# ----------------------------------------------------------------------------------------------- child side


def _resolve(spec: FnSpec) -> Any:
    modname, qualname, path = spec
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError:
        if path is None:
            raise
        d = os.path.dirname(os.path.abspath(path))
        if d not in sys.path:
            sys.path.insert(0, d)
        mod_spec = importlib.util.spec_from_file_location(modname, path)
        assert mod_spec is not None and mod_spec.loader is not None
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[modname] = mod
        mod_spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _portable(x: Any) -> Any:
    """Detach/clone tensors inside dicts, lists and tuples so the result pickles by value; CUDA tensors are copied
    to the CPU (the parent may have no GPU context, and compares with CPU references)."""
    import torch

    if isinstance(x, torch.Tensor):
        from torch.distributed.tensor import DTensor

        if isinstance(x, DTensor):
            raise TypeError(
                "a rank returned a DTensor; return x.full_tensor() or x.to_local() (and x.placements) instead"
            )
        return x.detach().clone() if x.device.type == "cpu" else x.detach().cpu()
    if isinstance(x, dict):
        return {k: _portable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_portable(v) for v in x]
    if isinstance(x, tuple):
        items = [_portable(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _watchdog(alive: Connection) -> None:
    """Kill this rank (and its process group) once the parent's end of the alive pipe closes."""
    with contextlib.suppress(EOFError, OSError):
        alive.recv_bytes()
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(70)


def _rank_entry(
    rank: int,
    world_size: int,
    placement: tuple[str, bool, str | None],
    rdzv: tuple[str, Any],
    pg_timeout: float,
    fn_spec: FnSpec,
    imports: list[str],
    payload: bytes,
    result_conn: Connection,
    alive_conn: Connection,
    log_path: str,
) -> None:
    with contextlib.suppress(OSError):  # own process group: the parent can kill this rank's descendants
        os.setpgid(0, 0)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
    threading.Thread(target=_watchdog, args=(alive_conn,), name="parent-watchdog", daemon=True).start()

    device, hide_gpus, precision = placement  # "cpu" | "cuda"; this CPU rank hides the GPUs; matmul precision
    env: dict[str, object] = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": rank}
    env.update(LOCAL_WORLD_SIZE=world_size, GROUP_RANK=0, MASTER_ADDR=HOST, OMP_NUM_THREADS=1)
    if rdzv[0] == "tcp":
        env["MASTER_PORT"] = rdzv[1]
    if hide_gpus:  # a CPU rank on a GPU machine: what picks a device by itself (fully_shard's mesh) picks the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update({k: str(v) for k, v in env.items()})
    import torch
    import torch.distributed as dist
    from torch._C._distributed_c10d import FileStore, Store, TCPStore

    global _rank_device_type
    torch.set_num_threads(RANK_THREADS)
    msg: Status
    try:
        if device == "cuda":  # one GPU per rank (choose_device checked the count): NCCL's communicator is per device
            torch.cuda.set_device(rank)
        _rank_device_type = device
        for name in imports:  # asked for by this call, not preloaded by the forkserver
            importlib.import_module(name)
        if precision is not None:  # after the imports: a preloaded module may set the process's own
            torch.set_float32_matmul_precision(precision)
        fn = _resolve(fn_spec)
        args, kwargs = pickle.loads(payload)
        td = timedelta(seconds=pg_timeout)
        store: Store
        if rdzv[0] == "tcp":
            store = TCPStore(HOST, rdzv[1], world_size, is_master=False, timeout=td)
        else:
            store = FileStore(rdzv[1], world_size)
            store.set_timeout(td)
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size, timeout=td)
        # every rank connected before any body runs: a rank whose body returns at once would otherwise tear its
        # side of the mesh down while a slower rank is still connecting (its error, not its body's, comes back)
        dist.barrier()
        result = fn(rank, world_size, *args, **kwargs)
        msg = ("ok", pickle.dumps(_portable(result), protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        exc_bytes: bytes | None
        try:
            exc_bytes = pickle.dumps(e)
            pickle.loads(exc_bytes)
        except Exception:
            exc_bytes = None
        msg = ("err", type(e).__name__, tb, exc_bytes)
    result_conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
    result_conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------- parent side


@contextlib.contextmanager
def rank_threads() -> Iterator[None]:
    """Run the body with the ranks' torch thread count (``RANK_THREADS``), then restore this process's: the
    single-process twin of a distributed run then multiplies with the same kernels, so they agree bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fn_spec(fn: Callable[..., Any]) -> FnSpec:
    modname = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not modname or not qualname or "<" in qualname:
        raise TypeError(f"run_ranks needs a module-level function, got {fn!r}")
    mod = sys.modules.get(modname)
    path = getattr(mod, "__file__", None)
    return modname, qualname, path


def _read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _tail(path: str) -> str:
    """The end of a rank's log."""
    text = _read_log(path)
    return text if len(text) <= _LOG_TAIL else "...\n" + text[-_LOG_TAIL:]


def _kill(proc: BaseProcess) -> None:
    if not proc.is_alive():
        return
    if proc.pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, ValueError):
        proc.kill()


def _collect(procs: list[BaseProcess], conns: list[Connection], timeout: float) -> tuple[dict[int, Status], list[int]]:
    """Each rank's report (or death) until all are in, ``timeout`` passes, or a failure's grace ends."""
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    grace_end = float("inf")
    status: dict[int, Status] = {}
    failed: list[int] = []  # in order of arrival
    while len(status) < world_size:
        now = time.monotonic()
        limit = min(deadline, grace_end)
        if now >= limit:
            break
        waitables: dict[Connection | int, int] = {}
        for r in range(world_size):
            if r not in status:
                waitables[conns[r]] = r
                waitables[procs[r].sentinel] = r
        for obj in multiprocessing.connection.wait(list(waitables), timeout=limit - now):
            r = waitables[obj]  # type: ignore[index]  # wait() returns the objects it was given
            if r in status:
                continue
            got: Status | None = None
            if conns[r].poll():
                with contextlib.suppress(EOFError, OSError):
                    got = pickle.loads(conns[r].recv_bytes())
            if got is None:
                if procs[r].is_alive() and obj is conns[r]:
                    continue  # should not happen: readable pipe, no message, live process
                procs[r].join(5)
                got = ("died", procs[r].exitcode)
            status[r] = got
            if got[0] != "ok":
                failed.append(r)
                grace_end = min(grace_end, time.monotonic() + _FAILURE_GRACE_S)
    return status, failed


def _rank_error(status: dict[int, Status], failed: list[int], pending: list[int], logs: list[str]) -> RankError:
    """The error for ``failed`` ranks (first to fail first), with the ``pending`` ranks' stacks; cause set."""
    failures: dict[int, str] = {}
    types: dict[int, str] = {}
    cause: BaseException | None = None
    for r in failed:
        st = status[r]
        if st[0] == "err":
            types[r], failures[r] = st[1], st[2]
            if cause is None and st[3] is not None:
                with contextlib.suppress(Exception):
                    cause = pickle.loads(st[3])
        else:
            types[r] = "died"
            failures[r] = f"process exited with code {st[1]} without reporting\n" + _tail(logs[r])
    first = failed[0]
    if types[first] != "died":
        head = f"rank {first} raised {types[first]}"
    else:
        head = f"rank {first} died (exit code {status[first][1]})"
    others = [r for r in failed if r != first]
    if others:
        head += f"; ranks {others} failed too"
    if pending:
        head += f"; ranks {pending} were still running and were killed"
    parts = [head]
    parts += [f"\n----- rank {r} ({types[r]}) -----\n{failures[r].rstrip()}" for r in failed]
    parts += [f"\n----- rank {r} (killed) stack / output -----\n{_tail(logs[r])}" for r in pending]
    err = RankError("\n".join(parts), failures, types)
    err.__cause__ = cause
    return err


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float | None = None,
    rendezvous: str = "file",
    preload: Sequence[str] | None = None,
    device: str | None = None,
    matmul_precision: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    ``timeout``: seconds for all ranks to report, counted after they are started. ``pg_timeout``: the ranks'
    ``init_process_group`` timeout (default ``timeout + 30``). ``rendezvous``: ``"file"`` (``FileStore``,
    default) or ``"tcp"`` (``TCPStore`` hosted by the parent on a free port). ``preload``: module names to
    import before ``fn`` runs, in the forkserver if this is the process's first call, else in each rank.
    ``device``: ``"auto"``, ``"cpu"`` or ``"cuda"`` (:func:`choose_device`; ``None``: ``DISCO_DEVICE``, else
    ``"auto"``). ``matmul_precision``: ``torch.set_float32_matmul_precision`` in each rank before ``fn`` (``None``:
    the rank keeps what its imports set). ``args`` / ``kwargs`` must pickle; ``timeout``, ``pg_timeout``,
    ``rendezvous``, ``preload``, ``device`` and ``matmul_precision`` are not passed on to ``fn``.
    """
    from torch._C._distributed_c10d import TCPStore

    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if rendezvous not in ("file", "tcp"):
        raise ValueError(f"rendezvous must be 'file' or 'tcp', got {rendezvous!r}")
    spec = _fn_spec(fn)
    chosen = choose_device(world_size, device)
    if matmul_precision not in (None, "highest", "high", "medium"):
        raise ValueError(f"matmul_precision must be 'highest', 'high', 'medium' or None, got {matmul_precision!r}")
    placement = (chosen, chosen == "cpu" and _cuda_available(), matmul_precision)
    payload = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    pg_timeout = float(timeout + 30.0 if pg_timeout is None else pg_timeout)
    ctx, imports = _context(list(preload or ()))

    logdir = tempfile.mkdtemp(prefix="disco-ranks-")
    store: TCPStore | None = None
    rdzv: tuple[str, Any] = ("file", os.path.join(logdir, "store"))
    if rendezvous == "tcp":
        td = timedelta(seconds=pg_timeout)
        store = TCPStore(HOST, 0, None, is_master=True, timeout=td, wait_for_workers=False)
        rdzv = ("tcp", store.port)
    logs = [os.path.join(logdir, f"rank{r}.log") for r in range(world_size)]
    alive_r, alive_w = ctx.Pipe(duplex=False)
    procs: list[BaseProcess] = []
    conns: list[Connection] = []
    try:
        for r in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_entry,
                args=(r, world_size, placement, rdzv, pg_timeout, spec, imports, payload, send, alive_r, logs[r]),
                name=f"disco-rank{r}",
            )
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        alive_r.close()

        status, failed = _collect(procs, conns, timeout)
        pending = [r for r in range(world_size) if r not in status]
        if pending:  # dump the stacks of the ranks that are still running (``finally`` kills everything)
            for r in pending:
                pid = procs[r].pid
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGUSR1)
            _wait_for_dumps([logs[r] for r in pending], within=3.0)
        if failed:
            raise _rank_error(status, failed, pending, logs)
        if pending:
            parts = [f"ranks {pending} of {world_size} did not finish within {timeout:g} s; all ranks killed"]
            parts += [f"\n----- rank {r} stack / output -----\n{_tail(logs[r])}" for r in pending]
            raise TimeoutError("\n".join(parts))

        # Everyone reported success: they must now exit on their own.
        exit_deadline = time.monotonic() + _EXIT_GRACE_S
        for p in procs:
            p.join(max(0.0, exit_deadline - time.monotonic()))
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0]
        if stuck or bad:
            for p in procs:
                _kill(p)
            raise RuntimeError(
                f"ranks reported success but did not exit cleanly: still running {stuck}, "
                f"exit codes {bad}\n" + "\n".join(_tail(x) for x in logs)
            )
        return [pickle.loads(status[r][1]) for r in range(world_size)]
    finally:
        for p in procs:
            _kill(p)
        for p in procs:
            p.join(5)
            with contextlib.suppress(ValueError):
                p.close()
        for c in conns:
            c.close()
        alive_w.close()
        if not alive_r.closed:
            alive_r.close()
        del store
        _replay_logs(logs)
        shutil.rmtree(logdir, ignore_errors=True)


def _wait_for_dumps(paths: list[str], within: float) -> None:
    """Wait until every log holds a faulthandler dump and has stopped growing (at most ``within`` s)."""
    end = time.monotonic() + within
    sizes: list[int] = []
    while time.monotonic() < end:
        time.sleep(0.1)
        new = [os.path.getsize(x) if os.path.exists(x) else 0 for x in paths]
        if new == sizes and all("most recent call first" in _read_log(x) for x in paths):
            return
        sizes = new


def _replay_logs(logs: list[str]) -> None:
    out = io.StringIO()
    for r, path in enumerate(logs):
        for line in _read_log(path).splitlines():
            out.write(f"[rank {r}] {line}\n")
    if out.getvalue():
        sys.stdout.write(out.getvalue())
