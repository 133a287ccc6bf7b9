"""One shard process: load the slice, join the mesh, warm up, then serve until SIGTERM.

Health ("" and the ShardService name) is NOT_SERVING until weights are loaded, the mesh is whole
and one real forward pass has run; it goes back to NOT_SERVING while the mesh is broken (then
re-forms it) and while draining. "liveness" is SERVING while the process is alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from model_formats.checkpoint import load_model_config, model_fingerprint
from services.auth import internal_auth
from services.errors import Unavailable
from services.pb.cpumesh.v1 import shard_pb2
from services.server import bind, create_server
from services.transport import server_credentials
from shard_svc import heap, native
from shard_svc.compiled_step import compile_decode
from shard_svc.config import ShardConfig
from shard_svc.engine import ShardEngine
from shard_svc.ipex_backend import with_ipex
from shard_svc.kernels import check_library, choose_kernels
from shard_svc.kv_cache import KVCache
from shard_svc.kv_store import kv_bytes_per_token
from shard_svc.mesh.communicator import Communicator, LocalOnly, MeshError, SingleRank
from shard_svc.model import ShardModel, make_batch
from shard_svc.servicer import ShardServicer
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights

log = logging.getLogger("cpumesh.shard")
LIVENESS = "liveness"
REFORM_ATTEMPT_S = 5.0  # one try at re-forming; then the sockets are rebuilt and it tries again
WATCH_INTERVAL_S = 0.2  # how often a rank between steps looks at its mesh


def open_mesh(config: ShardConfig, fingerprint: str) -> Any:
    """The communicator among the group's ranks (blocks until formed or its deadline)."""
    if config.tp_size == 1:
        return SingleRank()
    from shard_svc.mesh.group import MeshGroup

    return MeshGroup(config.mesh_config(fingerprint))


def memory_mb() -> dict[str, float]:
    """This process's resident set now (VmRSS) and at its peak (VmHWM), in MiB."""
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in out:
                out[key] = int(line.split()[1]) / 1024
    return out


def warm_up(model: ShardModel, cache: KVCache) -> None:
    """One real forward pass through every layer of the model's weights, outside any
    sequence's state and without the mesh (a twin model whose sums are skipped), so a rank can
    warm up while its peers serve."""
    seq_id, plan = -1, model.plan
    twin = ShardModel(model.config, plan, model.w, LocalOnly(plan.tp_rank, plan.tp_size),
                      model.kernels)
    try:
        twin.forward(make_batch([(seq_id, [0, 1, 2, 3])], cache), cache)
    finally:
        cache.release(seq_id)


class ShardProcess:
    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self.model_config = load_model_config(config.model_dir)
        self.plan = plan_shard(self.model_config, config.tp_rank, config.tp_size)
        self.fingerprint = f"{model_fingerprint(config.model_dir)}-tp{config.tp_size}"
        self.mesh: Any = None
        self.servicer: ShardServicer | None = None
        self.reforming: asyncio.Task[None] | None = None
        self.mesh_error: Exception | None = None  # what broke the mesh last

    async def serve(self) -> int:
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        check_library(cfg.kernels, getattr(torch, cfg.dtype))  # before anything starts
        creds = (server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
                 if cfg.tls_cert and cfg.tls_key else None)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        servicer = ShardServicer(self.fingerprint, cfg.model_dir.name, cfg.dtype,
                                 on_step_failure=self.on_step_failure,
                                 formation=self.formation)
        self.servicer = servicer
        service = bind(servicer, shard_pb2.DESCRIPTOR.services_by_name["ShardService"])
        self.server, port = create_server(service, address=cfg.listen, credentials=creds,
                                          health_address=cfg.health_listen,
                                          auth=internal_auth(cfg.internal_token))
        await self.server.start(serving=False)  # answers health (NOT_SERVING) while loading
        await self.server.set_serving(True, LIVENESS)
        # The C++ kernels, built (~40 s the first time) or loaded before the weights: their
        # libraries are not the model's memory, and no formed mesh waits for their build
        await loop.run_in_executor(servicer.executor, native.load)
        rss_before = memory_mb()["VmRSS"]
        log.info("rank %d/%d on port %d: loading %s, %s", cfg.tp_rank, cfg.tp_size, port,
                 cfg.model_dir, self.plan)
        # Every torch computation runs on the step thread (servicer.executor): OpenMP keeps a
        # pool of worker threads per thread that starts parallel work, and a second pool (made
        # by loading, or by zeroing the KV cache on the event loop) slowed every later step
        # (a compiled SmolLM2 step: 29-33 ms in the shard against 13.5 in one thread).
        weights = await loop.run_in_executor(servicer.executor, load_shard_weights, cfg.model_dir,
                                             self.model_config, self.plan,
                                             getattr(torch, cfg.dtype), cfg.kernels != "ipex")
        log.info("weights loaded in %.1f s (%s); choosing kernels", time.monotonic() - t0,
                 weights.served or cfg.dtype)
        t1 = time.monotonic()
        plain = await loop.run_in_executor(
            servicer.executor, choose_kernels, cfg.kernels, weights.embed.dtype,
            [layer.gate_up for layer in weights.layers], cfg.compile != "decode")
        # IPEX around them, or not: one log line says which backend, and why not IPEX
        kernels = await loop.run_in_executor(servicer.executor, with_ipex, cfg.kernels, plain)
        log.info("kernels chosen in %.1f s; forming the mesh; %s", time.monotonic() - t1,
                 kernels.describe())
        self.mesh = await loop.run_in_executor(None, open_mesh, cfg, self.fingerprint)
        comm: Communicator = self.mesh
        t1 = time.monotonic()
        model = await loop.run_in_executor(servicer.executor, ShardModel, self.model_config,
                                           self.plan, weights, comm, kernels)
        del weights  # the model holds them in the kernels' layout
        kv_dtype = torch.int8 if cfg.kv_dtype == "int8" else model.dtype
        tokens = cfg.kv_tokens(kv_bytes_per_token(self.model_config.num_layers,
                                                  self.plan.num_kv_heads,
                                                  self.model_config.head_dim, kv_dtype))
        cache = await loop.run_in_executor(servicer.executor, model.new_cache, tokens,
                                           cfg.kv_page_size, cfg.prefix_cache, kv_dtype)
        log.info("KV cache: %d tokens in %.1f MiB, %s", cache.capacity_tokens,
                 cache.nbytes / 2**20, "int8 (a scale per token and head)"
                 if kv_dtype == torch.int8 else str(kv_dtype).removeprefix("torch."))
        await loop.run_in_executor(servicer.executor, warm_up, model, cache)
        log.info("mesh formed; weights prepared and warmed up in %.1f s", time.monotonic() - t1)
        compiled = None
        if cfg.compile == "decode":  # every bucket compiled now, never while serving
            compiled = await loop.run_in_executor(servicer.executor, compile_decode, model, cache,
                                                  cfg.compile_rows)
        engine = ShardEngine(model, cache, cfg.max_context, compiled)
        # start-up's freed buffers handed back (shard_svc/heap.py: 1B int8 tp 2, 24 MiB a rank)
        await loop.run_in_executor(servicer.executor, heap.settle)
        servicer.engine = engine
        await self.server.set_serving(True)
        watcher = asyncio.ensure_future(self._watch()) if hasattr(self.mesh, "watch") else None
        log.info("rank %d SERVING after %.1f s", cfg.tp_rank, time.monotonic() - t0)
        mem = memory_mb()
        log.info("memory: %.0f MB before loading, %.0f MB now, peak %.0f MB (KV cache %.0f MB)",
                 rss_before, mem["VmRSS"], mem["VmHWM"],
                 engine.cache.nbytes / 2**20)
        try:
            await self.server.serve_until_signal(cfg.drain_grace_s)
        finally:
            for task in (watcher, self.reforming):
                if task is not None:
                    task.cancel()
            if hasattr(self.mesh, "interrupt"):
                self.mesh.interrupt()  # a re-forming in progress gives up: stop now
            servicer.executor.shutdown(wait=True)
            if hasattr(self.mesh, "close"):
                self.mesh.close()
        log.info("rank %d stopped", cfg.tp_rank)
        return 0

    def formation(self) -> int:
        """The id of the mesh formation steps run on; Unavailable while the mesh is broken."""
        formation = getattr(self.mesh, "formation", 0)
        if formation is None:
            why = self.mesh_error if self.reforming is not None else self.mesh.broken
            raise Unavailable(f"the mesh is broken and re-forming: {why}")
        return int(formation)

    async def on_step_failure(self, error: BaseException) -> None:
        """A step failed: if the mesh broke, re-form it."""
        if isinstance(error.__cause__, MeshError):
            await self._broken(error.__cause__)

    async def _watch(self) -> None:
        """Between steps, look at the mesh (peer events, ABORT, a peer's new HELLO) so that a rank
        that is not stepping notices its group broke. The look runs on the step thread, so it
        never races a step, and never waits."""
        assert self.servicer is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.reforming is not None:
                continue
            try:
                await loop.run_in_executor(self.servicer.executor, self.mesh.watch)
            except MeshError as e:
                await self._broken(e)
            except Exception as e:  # a socket in a state we did not foresee: rebuild them all
                log.exception("watching the mesh failed")
                await self._broken(MeshError(f"watching the mesh failed: {e!r}"))

    async def _broken(self, error: Exception) -> None:
        """The mesh broke: NOT_SERVING (before the failed step answers), and re-form it in the
        background (once)."""
        if self.reforming is None and hasattr(self.mesh, "reform"):
            log.warning("mesh broken: %s; NOT_SERVING until it is re-formed", error)
            self.mesh_error = error
            self.reforming = asyncio.ensure_future(self._reform())
            await self.server.set_serving(False)

    async def _reform(self) -> None:
        """Re-form on the step thread, so no step runs while the sockets are rebuilt; try again
        until every peer is back (a paused or restarted rank rejoins by itself)."""
        assert self.servicer is not None
        loop = asyncio.get_running_loop()
        t0, attempt = time.monotonic(), 0
        try:
            while True:
                attempt += 1
                try:
                    await loop.run_in_executor(self.servicer.executor, self.mesh.reform,
                                               REFORM_ATTEMPT_S)
                    break
                except Exception as e:  # the peer is still away: keep trying
                    log.warning("mesh not re-formed after %.1f s (attempt %d of %g s): %s",
                                time.monotonic() - t0, attempt, REFORM_ATTEMPT_S, e)
                    await asyncio.sleep(0.5)
            log.info("mesh re-formed after %.1f s (attempt %d); SERVING",
                     time.monotonic() - t0, attempt)
            await self.server.set_serving(True)
        finally:
            self.reforming = None
