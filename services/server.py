"""The common gRPC server bootstrap of every cpumesh service (`grpc.aio`).

    service = bind(servicer, shard_pb2.DESCRIPTOR.services_by_name["ShardService"])
    server, port = create_server(service, address="127.0.0.1:0")   # inside the event loop
    await server.start(serving=False)      # health: NOT_SERVING until warmed up
    await server.set_serving(True)
    await server.serve_until_signal(grace_s=10.0)  # SIGTERM/SIGINT → drain → stop

* `bind` registers a servicer's methods without a request deserializer; each handler parses the
  bytes itself, so garbage gets INVALID_ARGUMENT instead of UNKNOWN. A servicer is written like a
  generated `*Servicer` (async methods taking the parsed request and the context; server streams
  as async generators). Methods it lacks answer UNIMPLEMENTED.
  Methods named in the servicer's `raw_requests` get the request bytes, to bound or parse them
  as they see fit (e.g. in a thread).
* Each bound method maps `CpumeshError` to its status code with the message as details,
  `NotImplementedError` to UNIMPLEMENTED, anything else to INTERNAL with the traceback logged
  (`abort_with`). This is done where the handler is bound, not by a server interceptor: grpc.aio
  runs interceptors as coroutines for every call, before the handler (~30 µs a call here, ~8 % of
  what a refused call costs the server; the calls of a burst are taken one at a time).
* The standard `grpc.health.v1` service reports "" and every bound service, optionally also on a
  separate plaintext port: Kubernetes' gRPC probes speak no TLS.
* `auth` (a `services.auth.AuthInterceptor`) refuses calls without an accepted bearer token,
  health and reflection excepted.
* Reflection is off by default and needs the optional `grpcio-reflection` package.
* Message limits, keepalive and TLS credentials (`server_options`, `server_credentials` and
  their client halves) are in `services.transport`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.errors import CpumeshError, InvalidArgument
from services.transport import server_options

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
C = TypeVar("C")
Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def setup_logging(level: str | int = "INFO", *, name: str = "cpumesh") -> None:
    """One line per record, with time, level, process name and logger; for entry points only."""
    logging.basicConfig(level=level, force=True,
                        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")


def run_service(command: str, args: argparse.Namespace,
                build_config: Callable[[argparse.Namespace], C],
                serve: Callable[[C], Coroutine[Any, Any, int]]) -> int:
    """Every service's `cli_run`: set up logging, build the config (a ValueError exits with one
    line naming `cpumesh COMMAND`), then serve until done; returns the exit status."""
    setup_logging(args.log_level, name="cpumesh")
    try:
        config = build_config(args)
    except ValueError as e:
        raise SystemExit(f"cpumesh {command}: error: {e}") from None
    return asyncio.run(serve(config))


def parse(message_class: type[M], data: bytes) -> M:
    """Parse request bytes; garbage raises InvalidArgument (→ INVALID_ARGUMENT)."""
    try:
        return message_class.FromString(data)
    except DecodeError as e:
        raise InvalidArgument(
            f"cannot parse the request as {message_class.DESCRIPTOR.full_name}: {e}") from None


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _iterate(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's result: an async or sync iterator, or a coroutine using write()."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    elif result is not None:
        for item in result:
            yield item


@dataclass(frozen=True)
class BoundService:
    """A servicer's methods as a generic handler, with the service's full name for health."""

    name: str
    handler: grpc.GenericRpcHandler


def bind(servicer: object, service: ServiceDescriptor) -> BoundService:
    """Register `servicer`'s methods for `service`, each parsing its own request bytes."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name, None)
        if impl is None:
            continue
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported")
        parsing = impl if method.name in getattr(servicer, "raw_requests", ()) else \
            functools.partial(_call_parsed, impl,
                              message_factory.GetMessageClass(method.input_type))
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        path = f"/{service.full_name}/{method.name}"
        handlers[method.name] = make(_adapt(parsing, method.server_streaming, path),
                                     response_serializer=serialize)
    return BoundService(service.full_name,
                        grpc.method_handlers_generic_handler(service.full_name, handlers))


def _call_parsed(impl: Behavior, request_class: type[Message], data: bytes,
                 context: grpc.aio.ServicerContext) -> Any:
    return impl(parse(request_class, data), context)


def _adapt(call: Behavior, streaming: bool, method: str | None = None) -> Behavior:
    """An async unary behavior or async generator around `call`; with `method`, exceptions
    become statuses (see `abort_with`), without it they propagate."""
    if streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in _iterate(call(request, context)):
                    yield item
            except Exception as e:
                if method is None or isinstance(e, grpc.aio.AbortError):
                    raise
                await abort_with(context, method, e)
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await _maybe_await(call(request, context))
        except Exception as e:
            if method is None or isinstance(e, grpc.aio.AbortError):
                raise
            await abort_with(context, method, e)
    return unary


async def abort_with(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    """End the call with the status `error` stands for."""
    if isinstance(error, CpumeshError):
        code, details = error.code, str(error) or type(error).__name__
    elif isinstance(error, NotImplementedError):
        code, details = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented"
    else:
        log.error("unhandled error in %s", method, exc_info=error)
        code = grpc.StatusCode.INTERNAL
        details = f"internal error in {method}: {type(error).__name__}: {error}"[:1000]
    await context.abort(code, details)


class Server:
    """A started-on-demand gRPC server with its health service (and optional health port)."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                 service_names: Sequence[str], health_server: grpc.aio.Server | None = None,
                 health_port: int | None = None) -> None:
        self.grpc_server = server
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.health_server = health_server
        self.health_port = health_port
        self._stopping = asyncio.Event()

    async def start(self, *, serving: bool = True) -> None:
        await self.set_serving(serving)
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        """Health of `service`, or of "" and every bound service when None."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names) if service is None else (service,):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish for `grace` seconds."""
        self._stopping.set()
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(None)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.grpc_server.wait_for_termination(timeout)

    async def serve_until_signal(
            self, grace_s: float,
            signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
            drain_also: Callable[[], Awaitable[None]] | None = None) -> int | None:
        """Serve until one of `signals`, then stop gracefully; return the signal's number.
        `drain_also` (e.g. an HTTP server's graceful stop, bounded by the same grace) runs
        alongside the gRPC drain.

        Returns None at once when `stop` is called by someone else."""
        loop = asyncio.get_running_loop()
        received: asyncio.Future[int] = loop.create_future()

        def on_signal(sig: int) -> None:
            if not received.done():
                received.set_result(sig)

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, int(sig))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            waits: set[asyncio.Future[Any]] = {received, stopping}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
        if not received.done():
            return None
        log.info("signal %d: draining for up to %.1f s", received.result(), grace_s)
        await asyncio.gather(self.stop(grace_s), *([drain_also()] if drain_also else []))
        return received.result()


def create_server(*services: BoundService, address: str = "127.0.0.1:0",
                  credentials: grpc.ServerCredentials | None = None,
                  health_address: str | None = None, reflection: bool = False,
                  options: Sequence[tuple[str, Any]] | None = None,
                  maximum_concurrent_rpcs: int | None = None,
                  auth: grpc.aio.ServerInterceptor | None = None) -> tuple[Server, int]:
    """Build (not start) a server for `services` bound to `address`; returns (server, port).

    Call it from a running event loop. `credentials` (see `server_credentials`) serve TLS;
    `health_address` adds a plaintext port that serves only health; `auth` (first, outermost)
    refuses unauthenticated calls.
    """
    options = list(options if options is not None else server_options())
    interceptors: list[grpc.aio.ServerInterceptor] = [auth] if auth else []
    server = grpc.aio.server(interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=maximum_concurrent_rpcs)
    server.add_generic_rpc_handlers([s.handler for s in services])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.name for s in services]
    if reflection:
        _enable_reflection(server, names)
    port = _listen(server, address, credentials)
    health_server, health_port = None, None
    if health_address is not None:
        health_server = grpc.aio.server(interceptors=interceptors, options=options)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = _listen(health_server, health_address, None)
    return Server(server, health_servicer, names, health_server, health_port), port


def _listen(server: grpc.aio.Server, address: str,
            credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: {e}") from e
    if not port:
        raise OSError(f"cannot listen on {address}")
    return int(port)


def _enable_reflection(server: grpc.aio.Server, names: Sequence[str]) -> None:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        log.warning("reflection requested but grpcio-reflection is not installed; skipped")
        return
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
