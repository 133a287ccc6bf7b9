"""TokenizerConfig: everything one tokenizer process needs, built once from flags at the entry
point and validated here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizer_svc.chat_template import DEFAULT_ROLES
from tokenizer_svc.tokenizer import DEFAULT_MAX_TEXT_CHARS


@dataclass(frozen=True)
class TokenizerConfig:
    model_dir: Path
    model_name: str | None = None  # reported by Info; default: the directory's name
    listen: str = "127.0.0.1:50051"  # gRPC address
    health_listen: str | None = None  # separate plaintext health address (when TLS is on)
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS  # per text, or per chat's message contents
    workers: int = 4  # threads running tokenizer calls off the event loop
    chat_roles: tuple[str, ...] = tuple(sorted(DEFAULT_ROLES))
    reflection: bool = False
    drain_grace_s: float = 5.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # require client certificates signed by this CA
    # Calls (health excepted) must carry this token (services/auth.py); None: anyone may call.
    internal_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {self.max_text_chars}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.chat_roles or not all(self.chat_roles):
            raise ValueError(f"chat_roles must be non-empty names, got {self.chat_roles}")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        for name, address in (("listen", self.listen), ("health_listen", self.health_listen)):
            if address is not None:
                host, _, port = address.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"{name} {address!r} is not host:port")
        tls = (self.tls_cert, self.tls_key)
        if any(tls) and not all(tls):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca (client certificates) needs tls_cert and tls_key")
