"""Running the app: one uvicorn server that drains its streams before it stops, or N such worker processes on one
port (``serve --workers N``).

Why workers: one Python process serving many streams runs the WebSocket event loop, the caption dispatcher and the
scheduler's worker thread under one GIL. Workers are separate processes, each with its own model, scheduler and
CUDA graphs on the same GPU, accepting from one listening socket (the kernel hands each connection to one of
them). The stream limit stays global: every worker counts in the same shared-memory counter.

With ``engines=M`` (``serve --workers N --engines M``) the N workers are front-ends only (sockets, DSP, captions)
and M engine processes hold the model and a scheduler each (``trt_asr.serving.shared_engine``): the supervisor
starts the engines first, then the front-ends, which connect to every engine; on shutdown the front-ends drain
first, then the engines stop.

Shutdown (SIGINT / SIGTERM, to the server or to the supervisor, which forwards SIGTERM): new streams are refused,
the open ones end as if each client had sent ``{"type": "end"}`` (finals and ``end`` go out, then close code 1001),
for at most ``drain_timeout`` seconds; then uvicorn's own shutdown. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Callable

import uvicorn

from .app import MAX_FRAME_BYTES, Admission
from .heap import PAUSES, freeze_heap

logger = logging.getLogger("trt_asr.serving")


def uvicorn_options(log_level: str = "warning", ws_deflate: bool = False) -> dict:
    """What every server of ours passes to uvicorn: the websockets sans-I/O protocol where installed, and no
    permessage-deflate unless asked (browsers and the websockets client offer it; zlib on every PCM frame and event
    costs both ends CPU per message, and 16-bit PCM hardly compresses)."""
    try:
        sansio = importlib.util.find_spec("uvicorn.protocols.websockets.websockets_sansio_impl") is not None
    except ImportError:
        sansio = False
    return {"log_level": log_level, "ws_max_size": 4 * MAX_FRAME_BYTES, "ws": "websockets-sansio" if sansio else "auto",
            "ws_per_message_deflate": ws_deflate}


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown first stops accepting and lets the app drain its open streams."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float = 30.0):
        super().__init__(config)
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # no new connections while the open streams finish
            server.close()
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None and not self.force_exit:
            task = asyncio.ensure_future(drain(self.drain_timeout))
            while not task.done():
                if self.force_exit:  # a second Ctrl-C
                    task.cancel()
                    break
                await asyncio.sleep(0.05)
            if task.done() and not task.cancelled() and task.result():
                logger.warning("%d stream(s) still open after the %.0f s drain", task.result(), self.drain_timeout)
        await super().shutdown(sockets=sockets)


def serve_app(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
              log_level: str = "warning", sockets: list[socket.socket] | None = None, ws_deflate: bool = False) -> None:
    """Serve ``app`` in this process until SIGINT / SIGTERM, then drain (see the module docstring). The app is built
    (model loaded, warmed up): what exists now lives as long as the process, so it is frozen out of the collector's
    way (``heap.freeze_heap``) and the pauses that remain are counted for ``GET /health``."""
    freeze_heap()
    PAUSES.install()
    config = uvicorn.Config(app, host=host, port=port, **uvicorn_options(log_level, ws_deflate))
    DrainingServer(config, drain_timeout).run(sockets=sockets)


def _exit_with_supervisor() -> None:
    """Ask Linux to send this process SIGTERM when the supervisor dies, however it dies (even SIGKILL, which gives it
    no chance to stop its children): a worker or engine then drains and exits instead of serving on as an orphan."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def _worker(build: Callable, build_args: tuple, sock: socket.socket, sessions, ready, workers: int,
            max_sessions: int, drain_timeout: float, log_level: str, ws_deflate: bool, remote=None,
            engines: int = 0) -> None:
    """One worker process: build the app (loads the model, or connects to the engines), count itself ready, serve
    the shared socket."""
    # The supervisor forwards SIGTERM; a terminal's Ctrl-C also reaches every process of the group. uvicorn
    # installs its own handlers while it serves and re-raises the signal afterwards, with these: a clean exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _exit_with_supervisor()
    extra = {"remote": remote} if remote is not None else {}
    app = build(*build_args, admission=Admission(max_sessions, sessions),
                health=lambda: {"workers": workers, "workers_ready": ready.value, "worker_pid": os.getpid(),
                                **({"engine_processes": engines} if engines else {})}, **extra)
    with ready.get_lock():
        ready.value += 1
    serve_app(app, drain_timeout=drain_timeout, log_level=log_level, sockets=[sock], ws_deflate=ws_deflate)


def _engine(build: Callable, build_args: tuple, path: str, authkey: bytes, ready, drain_timeout: float) -> None:
    """One engine process (``serve --engines``): build the ``EngineHost`` (loads and warms the model), listen on
    ``path`` for the front-ends, count itself ready; on SIGTERM drain what is still open and stop."""
    from multiprocessing.connection import Listener

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    _exit_with_supervisor()
    host = build(*build_args)
    listener = Listener(path, family="AF_UNIX", authkey=authkey)
    freeze_heap()
    PAUSES.install()
    host.start(listener)
    with ready.get_lock():
        ready.value += 1
    while not stopping.wait(0.5):
        pass
    host.stop(drain_timeout)
    # where this engine's scheduler spent its time (steps, batch sizes, phases): the server log's record of the run
    logger.warning("engine %d scheduler: %s", os.getpid(), json.dumps(host.scheduler.stats.summary()))


def serve_workers(build: Callable, build_args: tuple, workers: int, host: str = "127.0.0.1", port: int = 8000,
                  max_sessions: int = 16, drain_timeout: float = 30.0, log_level: str = "warning",
                  on_ready: Callable[[], None] | None = None, start_timeout: float = 900.0,
                  ws_deflate: bool = False, engines: int = 0, engine_build: Callable | None = None,
                  engine_args: tuple = (), first_alone: bool = False) -> int:
    """Run ``workers`` processes, each serving ``build(*build_args, admission=..., health=...)`` (a picklable,
    module-level function that returns the app; ``health`` adds the workers' state to GET /health) on one
    listening socket. With ``engines`` > 0, first that many engine processes, each running
    ``engine_build(*engine_args)`` (an ``EngineHost``), and ``build`` also gets ``remote=`` (their
    ``EngineAddresses``). The supervisor loads nothing itself. If a worker or an engine dies,
    the others are stopped and the exit code is 1: a server that silently lost part of its capacity is worse than
    one that stops. ``first_alone``: the first process that holds the model (engine 0, or worker 0 without engines)
    starts and warms up alone, the others once it is ready. With ``torch.compile`` the first one then compiles and
    autotunes on its own and leaves its kernels and their tuned launch configurations in Inductor's on-disk cache;
    the others load those instead of timing candidates side by side under each other's load, where they can pick
    different reduction configurations and so compute slightly different fp16 numbers for the same stream.
    Returns the exit code."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if engines < 0 or (engines and engine_build is None):
        raise ValueError("engines > 0 needs engine_build")
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    sock = uvicorn.Config(app=None, host=host, port=port).bind_socket()
    sessions, ready, engines_ready = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    remote = None
    engine_procs = []
    if engines:
        from .shared_engine import engine_addresses

        remote = engine_addresses(engines)
        engine_procs = [ctx.Process(target=_engine, name=f"trt-asr-engine-{i}",
                                    args=(engine_build, engine_args, path, remote.authkey, engines_ready,
                                          drain_timeout))
                        for i, path in enumerate(remote.paths)]
    procs = [ctx.Process(target=_worker, name=f"trt-asr-worker-{i}",
                         args=(build, build_args, sock, sessions, ready, workers, max_sessions, drain_timeout,
                               log_level, ws_deflate, remote, engines))
             for i in range(workers)]
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        if stopping and signum == signal.SIGINT:  # second Ctrl-C: now
            for p in procs + engine_procs:
                if p.is_alive():
                    p.kill()
            return
        stopping = True
        for p in procs if any(p.pid is not None for p in procs) else engine_procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        started = time.monotonic()

        def wait_engines(n: int) -> None:  # until n engines are ready (or one died / the start timed out)
            nonlocal code, stopping
            while engines_ready.value < n and not stopping:
                dead = [p for p in engine_procs if p.exitcode is not None]
                if dead:
                    print(f"error: engine {dead[0].name} exited with code {dead[0].exitcode} while starting",
                          file=sys.stderr, flush=True)
                    code = 1
                    stopping = True
                elif time.monotonic() - started > start_timeout:
                    print(f"error: the engines did not start within {start_timeout:.0f} s", file=sys.stderr,
                          flush=True)
                    code = 1
                    stopping = True
                time.sleep(0.1)

        if engine_procs:  # the front-ends connect to them: all ready first
            first = 1 if first_alone else len(engine_procs)
            for p in engine_procs[:first]:
                p.start()
            wait_engines(first)
            if not stopping:
                for p in engine_procs[first:]:
                    p.start()
                wait_engines(engines)
        if not stopping:
            first = 1 if first_alone and not engine_procs else len(procs)
            for p in procs[:first]:
                p.start()
            while ready.value < first and not stopping and procs[0].exitcode is None \
                    and time.monotonic() - started < start_timeout:
                time.sleep(0.1)  # (a worker that dies or a start past the timeout: the loop below reports it)
            if not stopping:
                for p in procs[first:]:
                    p.start()
        announced = False
        while any(p.is_alive() for p in procs):
            if not stopping and any(p.exitcode is not None for p in procs + engine_procs):
                dead = [p for p in procs + engine_procs if p.exitcode is not None]
                print(f"error: {'worker' if dead[0] in procs else 'engine'} {dead[0].name} exited with code "
                      f"{dead[0].exitcode}; stopping the others", file=sys.stderr, flush=True)
                code = 1
                stop(signal.SIGTERM, None)
            if not announced and ready.value >= workers:
                announced = True
                # every worker has its own copy of the socket by now (spawn hands it over when the worker starts);
                # with ours closed, connecting once all workers stopped listening is refused, not left hanging
                sock.close()
                if on_ready is not None:
                    on_ready()
            if not announced and not stopping and time.monotonic() - started > start_timeout:
                print(f"error: the workers did not start within {start_timeout:.0f} s", file=sys.stderr, flush=True)
                code = 1
                stop(signal.SIGTERM, None)
            time.sleep(0.1)
        for p in procs:
            if p.pid is not None:
                p.join()
            if p.exitcode not in (0, None) and not stopping:
                code = 1
        # the front-ends have drained (their streams have their finals): now the engines
        for p in engine_procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        for p in engine_procs:
            if p.pid is not None:
                p.join(timeout=drain_timeout + 30)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs + engine_procs:
            if p.is_alive():
                p.kill()
        sock.close()
        if remote is not None:
            shutil.rmtree(os.path.dirname(remote.paths[0]), ignore_errors=True)
    return code
