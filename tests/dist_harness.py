"""Run a test body on several real ``torch.distributed`` ranks (gloo, CPU).

Writing a distributed test::

    from dist_harness import run_ranks

    def _body(rank, world_size, n):          # module level: the ranks import it by name
        import torch.distributed as dist
        t = torch.full((n,), float(rank))
        dist.all_reduce(t)
        return t                             # comes back to the parent, pickled

    def test_sum():
        out = run_ranks(_body, 4, 3)         # out[r] is rank r's return value
        assert torch.equal(out[0], torch.full((3,), 6.0))

Inside ``_body`` the default process group is initialised (gloo, one torch thread, ``RANK`` / ``WORLD_SIZE``
/ ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` / ``MASTER_ADDR`` set), so ``init_device_mesh("cpu", (2, 2))``,
``fully_shard``, ``parallelize_module`` and ``torch.distributed.checkpoint`` work directly.

Rendezvous: by default the ranks meet through a ``FileStore`` in a fresh temporary directory per call (no
ports at all). ``rendezvous="tcp"`` makes the parent host a ``TCPStore`` on a free port (``port=0``) instead
and also sets ``MASTER_PORT``; on this gVisor sandbox a ``TCPStore`` client constructor sometimes stalls for
exactly 5 s when several ranks connect at once (about 1 launch in 10-60), which the file store avoids.

What ``run_ranks`` guarantees:

* return values come back in rank order; tensors are detached and cloned before pickling (DTensors are
  refused: return ``x.full_tensor()`` or ``x.to_local()``);
* an exception on any rank is raised in the parent as :class:`RankError` whose message holds every failing
  rank's number and full traceback (the first failure's type is in the headline, the original exception is
  the ``__cause__`` when it unpickles); a rank that dies without reporting (segfault, ``os._exit``) counts
  as a failure too;
* if not every rank reports within ``timeout`` seconds (counted from the moment all ranks are started), the
  hung ranks' Python stacks are dumped, every rank and its descendants are killed, and ``TimeoutError``
  names the ranks that did not finish (with their stacks), so a deadlock fails the test instead of hanging
  CI. The ranks' gloo timeout (``pg_timeout``) defaults to ``timeout`` + 30 s, so the harness, not gloo,
  catches a deadlock;
* each rank watches the parent through a pipe and kills itself if the parent dies;
* what a rank prints (stdout and stderr) is replayed on the parent's stdout with a ``[rank r]`` prefix, so
  pytest shows it for failing tests.

Processes come from a ``forkserver`` that preloads torch and its distributed modules: the first call pays a
few seconds of warm-up, later calls about 0.1-0.3 s. The function must be a module-level function of an
importable module (a test file in ``tests/`` is fine: ``conftest.py`` puts ``tests/`` on ``sys.path``).
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
from datetime import timedelta
from typing import Any

__all__ = ["RankError", "run_ranks", "HOST"]

HOST = "127.0.0.1"

_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.tensor.parallel",
    "torch.distributed.checkpoint",
    "pytest",
]

# After the first failure, how long the other ranks get to report before they are killed.
_FAILURE_GRACE_S = 10.0
# After every rank reported, how long they get to exit.
_EXIT_GRACE_S = 15.0
# Log tail shown for a rank in an error message.
_LOG_TAIL = 4000

_ctx_lock = threading.Lock()
_ctx: Any = None


class RankError(RuntimeError):
    """One or more ranks raised (or died). ``failures`` maps rank -> formatted traceback / reason."""

    def __init__(self, message: str, failures: dict[int, str], exc_types: dict[int, str]):
        super().__init__(message)
        self.failures = failures
        self.exc_types = exc_types


def _context() -> Any:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(list(_PRELOAD))
            _ctx = ctx
        return _ctx


# ----------------------------------------------------------------------------------------------- child side


def _resolve(spec: tuple[str, str, str | None]) -> Any:
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
    """Detach/clone tensors inside dicts, lists and tuples so the result pickles by value."""
    import torch

    if isinstance(x, torch.Tensor):
        from torch.distributed.tensor import DTensor

        if isinstance(x, DTensor):
            raise TypeError(
                "a rank returned a DTensor; return x.full_tensor() or x.to_local() (and x.placements) instead"
            )
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _portable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_portable(v) for v in x]
    if isinstance(x, tuple):
        items = [_portable(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _watchdog(alive: Any) -> None:
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
    rdzv: tuple[str, Any],
    pg_timeout: float,
    fn_spec: tuple[str, str, str | None],
    payload: bytes,
    result_conn: Any,
    alive_conn: Any,
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

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        MASTER_ADDR=HOST,
        OMP_NUM_THREADS="1",
    )
    if rdzv[0] == "tcp":
        os.environ["MASTER_PORT"] = str(rdzv[1])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    msg: tuple
    try:
        fn = _resolve(fn_spec)
        args, kwargs = pickle.loads(payload)
        td = timedelta(seconds=pg_timeout)
        if rdzv[0] == "tcp":
            store: Any = dist.TCPStore(HOST, rdzv[1], world_size, is_master=False, timeout=td)
        else:
            store = dist.FileStore(rdzv[1], world_size)
            store.set_timeout(td)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=td)
        result = fn(rank, world_size, *args, **kwargs)
        msg = ("ok", pickle.dumps(_portable(result), protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            exc_bytes: bytes | None = pickle.dumps(e)
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


def _fn_spec(fn: Any) -> tuple[str, str, str | None]:
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


def _tail(text: str) -> str:
    return text if len(text) <= _LOG_TAIL else "...\n" + text[-_LOG_TAIL:]


def _kill(proc: Any) -> None:
    if not proc.is_alive():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, ValueError):
        proc.kill()


def run_ranks(
    fn: Any,
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float | None = None,
    rendezvous: str = "file",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return results by rank.

    ``timeout``: seconds for all ranks to report, counted after they are started. ``pg_timeout``: the ranks'
    ``init_process_group`` timeout (default ``timeout + 30``). ``rendezvous``: ``"file"`` (``FileStore``,
    default) or ``"tcp"`` (``TCPStore`` hosted by the parent on a free port). ``args`` / ``kwargs`` must
    pickle; ``timeout``, ``pg_timeout`` and ``rendezvous`` are not passed on to ``fn``.
    """
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if rendezvous not in ("file", "tcp"):
        raise ValueError(f"rendezvous must be 'file' or 'tcp', got {rendezvous!r}")
    spec = _fn_spec(fn)
    payload = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    pg_timeout = float(timeout + 30.0 if pg_timeout is None else pg_timeout)
    ctx = _context()

    logdir = tempfile.mkdtemp(prefix="disco-ranks-")
    store: Any = None
    if rendezvous == "tcp":
        td = timedelta(seconds=pg_timeout)
        store = dist.TCPStore(HOST, 0, None, is_master=True, timeout=td, wait_for_workers=False)
        rdzv: tuple[str, Any] = ("tcp", store.port)
    else:
        rdzv = ("file", os.path.join(logdir, "store"))
    logs = [os.path.join(logdir, f"rank{r}.log") for r in range(world_size)]
    alive_r, alive_w = ctx.Pipe(duplex=False)
    procs: list[Any] = []
    conns: list[Any] = []
    try:
        for r in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_rank_entry,
                args=(r, world_size, rdzv, pg_timeout, spec, payload, send, alive_r, logs[r]),
                name=f"disco-rank{r}",
            )
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        alive_r.close()

        deadline = time.monotonic() + timeout
        grace_end = float("inf")
        status: dict[int, tuple] = {}
        failed: list[int] = []  # in order of arrival
        while len(status) < world_size:
            now = time.monotonic()
            limit = min(deadline, grace_end)
            if now >= limit:
                break
            waitables: dict[Any, int] = {}
            for r in range(world_size):
                if r not in status:
                    waitables[conns[r]] = r
                    waitables[procs[r].sentinel] = r
            ready = multiprocessing.connection.wait(list(waitables), timeout=limit - now)
            for obj in ready:
                r = waitables[obj]
                if r in status:
                    continue
                got = None
                if conns[r].poll():
                    try:
                        got = pickle.loads(conns[r].recv_bytes())
                    except (EOFError, OSError):
                        got = None
                if got is None:
                    if procs[r].is_alive() and obj is conns[r]:
                        continue  # should not happen: readable pipe, no message, live process
                    procs[r].join(5)
                    got = ("died", procs[r].exitcode)
                status[r] = got
                if got[0] != "ok":
                    failed.append(r)
                    grace_end = min(grace_end, time.monotonic() + _FAILURE_GRACE_S)

        pending = [r for r in range(world_size) if r not in status]
        if pending:
            # Dump the stacks of the ranks that are still running, then kill everything.
            for r in pending:
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(procs[r].pid, signal.SIGUSR1)
            _wait_for_dumps([logs[r] for r in pending], within=3.0)
            for p in procs:
                _kill(p)
            for p in procs:
                p.join(5)

        if failed:
            failures: dict[int, str] = {}
            types: dict[int, str] = {}
            cause = None
            for r in failed:
                st = status[r]
                if st[0] == "err":
                    types[r] = st[1]
                    failures[r] = st[2]
                    if cause is None and st[3] is not None:
                        try:
                            cause = pickle.loads(st[3])
                        except Exception:
                            cause = None
                else:
                    types[r] = "died"
                    failures[r] = f"process exited with code {st[1]} without reporting\n" + _tail(_read_log(logs[r]))
            first = failed[0]
            head = (
                f"rank {first} raised {types[first]}"
                if types[first] != "died"
                else f"rank {first} died (exit code {status[first][1]})"
            )
            others = [r for r in failed if r != first]
            if others:
                head += f"; ranks {others} failed too"
            if pending:
                head += f"; ranks {pending} were still running and were killed"
            parts = [head]
            for r in failed:
                parts.append(f"\n----- rank {r} ({types[r]}) -----\n{failures[r].rstrip()}")
            for r in pending:
                parts.append(f"\n----- rank {r} (killed) stack / output -----\n{_tail(_read_log(logs[r]))}")
            err = RankError("\n".join(parts), failures, types)
            if cause is not None:
                raise err from cause
            raise err

        if pending:
            parts = [f"ranks {pending} of {world_size} did not finish within {timeout:g} s; all ranks killed"]
            for r in pending:
                parts.append(f"\n----- rank {r} stack / output -----\n{_tail(_read_log(logs[r]))}")
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
                f"exit codes {bad}\n" + "\n".join(_tail(_read_log(x)) for x in logs)
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
        text = _read_log(path)
        for line in text.splitlines():
            out.write(f"[rank {r}] {line}\n")
    if out.getvalue():
        sys.stdout.write(out.getvalue())
