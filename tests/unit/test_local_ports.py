"""`cpumesh local` refuses a busy router port before starting anything, naming the flag that
chooses that port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tools.local import LocalConfig, listen_address


@pytest.mark.parametrize(("field", "flag"), [("port", "--port"), ("http_port", "--http-port")])
def test_a_busy_port_names_its_flag(field: str, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = LocalConfig(Path("."), "m", **{"port": 0, "http_port": 0, field: port})
        with pytest.raises(OSError, match=f"{port}.*Pass {flag} with another number"):
            listen_address(config.host, getattr(config, field), flag)
        other = "port" if field == "http_port" else "http_port"
        listen, reach = listen_address(config.host, getattr(config, other),
                                       "--" + other.replace("_", "-"))
        assert listen == reach and listen.startswith("127.0.0.1:")  # the other one: any free
