"""Each service's command refuses a bad flag combination with one line naming the command, before
anything starts (services.server.run_service)."""

from __future__ import annotations

import pytest

from services.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["shard", "--tp-size", "2", "--peers", "127.0.0.1:1"],
     "cpumesh shard: error: peers lists 1 addresses but tp_size is 2"),
    (["shard", "--tp-size", "2", "--peers", "127.0.0.1:1,127.0.0.1"],
     "cpumesh shard: error: mesh: peer address '127.0.0.1' is not host:port"),
    (["shard", "--tp-size", "2", "--peers", "127.0.0.1:1,127.0.0.1:1"],
     "cpumesh shard: error: mesh: peers lists an address twice"),
    (["router", "--tokenizer", "127.0.0.1:1", "--shards", "127.0.0.1:2,127.0.0.1:2"],
     "cpumesh router: error: shards lists an address twice"),
    (["tokenizer", "--tls-cert", "cert.pem"], "cpumesh tokenizer: error: "),
])
def test_a_bad_configuration_exits_with_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv, environ={})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
