"""ShardConfig: everything one shard process needs, built once from flags at the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shard_svc.mesh.config import MeshConfig

DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")  # int8/int4: weight-only
KERNELS = ("auto", "aten", "onednn", "packed", "cpumesh", "ipex")
KV_DTYPES = ("auto", "int8")  # auto: the activations' dtype; int8: a scale per token and head
COMPILE = ("off", "decode")  # decode: decode steps compiled (compiled_step.py)


@dataclass(frozen=True)
class ShardConfig:
    model_dir: Path
    tp_rank: int
    tp_size: int
    peers: tuple[str, ...]  # mesh addresses "host:port" of every rank, by tp_rank (ours too)
    listen: str = "127.0.0.1:50061"  # gRPC address
    health_listen: str | None = None  # separate plaintext health port (when TLS is on)
    threads: int = 1
    dtype: str = "float32"
    kernels: str = "auto"  # which library runs the linears (shard_svc.kernels); auto: timed
    kv_capacity_tokens: int = 16384
    kv_cache_mb: float | None = None  # size the KV cache in MiB instead (then tokens are ignored)
    kv_dtype: str = "auto"
    kv_page_size: int = 16
    prefix_cache: bool = True  # reuse the KV pages of identical full blocks of prompts
    max_context: int | None = None  # default: the model's max_position_embeddings
    compile: str = "off"
    compile_rows: tuple[int, ...] = (1, 8)  # the batch buckets compiled (steps padded up to one)
    mesh_name: str = "cpumesh"
    mesh_listen: str | None = None  # bind the mesh here; default: our peers entry
    mesh_transport: str = "auto"  # see MeshConfig.transport
    mesh_stream_port: int = 0  # tcp transport: our data listener's port (0: any free one)
    mesh_timeout_s: float = 120.0  # forming the mesh
    drain_grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    curve_secret_key: Path | None = None  # this shard's CURVE key pair (zmq.auth format)
    curve_public_keys: Path | None = None  # directory with every peer's public key
    # Calls (health excepted) must carry this token (services/auth.py); None: anyone may call.
    internal_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in 0..{self.tp_size - 1}, got {self.tp_rank}")
        if len(self.peers) != self.tp_size:
            raise ValueError(
                f"peers lists {len(self.peers)} addresses but tp_size is {self.tp_size}")
        try:
            self.mesh_config()  # peers, mesh_listen, transport, ports, timeout, CURVE
        except ValueError as e:
            raise ValueError(f"mesh: {e}") from e
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {self.kv_capacity_tokens}")
        if self.kv_cache_mb is not None and not self.kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {COMPILE}, got {self.compile!r}")
        if not self.compile_rows or any(not 1 <= r <= 256 for r in self.compile_rows):
            raise ValueError(f"compile_rows must be 1 to 256 rows each, got {self.compile_rows}")
        if self.compile == "decode" and self.kernels == "packed":
            raise ValueError("compile decode freezes plain weights into its graphs: kernels "
                             "'packed' cannot go with it (use auto, aten or onednn)")
        if self.kv_page_size < 1:
            raise ValueError(f"kv_page_size must be >= 1, got {self.kv_page_size}")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")
        tls = (self.tls_cert, self.tls_key)
        if any(tls) and not all(tls):
            raise ValueError("TLS needs both tls_cert and tls_key")

    def kv_tokens(self, bytes_per_token: int) -> int:
        """The KV cache's tokens: `kv_capacity_tokens`, or as many whole pages as
        `kv_cache_mb` holds at `bytes_per_token` (at least one page)."""
        if self.kv_cache_mb is None:
            return self.kv_capacity_tokens
        pages = int(self.kv_cache_mb * 2**20) // (bytes_per_token * self.kv_page_size)
        return max(1, pages) * self.kv_page_size

    def mesh_config(self, fingerprint: str = "") -> MeshConfig:
        """The mesh part of this config (validated there)."""
        return MeshConfig(
            mesh_name=self.mesh_name, tp_rank=self.tp_rank, tp_size=self.tp_size,
            peers=self.peers, fingerprint=fingerprint, listen=self.mesh_listen,
            transport=self.mesh_transport, stream_port=self.mesh_stream_port,
            form_timeout_s=self.mesh_timeout_s, curve_secret_key=self.curve_secret_key,
            curve_public_keys=self.curve_public_keys)


def rank_from_hostname(hostname: str) -> int:
    """A StatefulSet pod's ordinal: `cpumesh-shard-3` → 3."""
    _, _, ordinal = hostname.rpartition("-")
    if not ordinal.isdigit():
        raise ValueError(
            f"cannot take tp_rank from hostname {hostname!r}: no trailing -<ordinal>")
    return int(ordinal)
