"""`python -m shard_svc --dtype int4` on a linked GGUF, two ranks over loopback: served at its own
precision (the log says so, Info says int4), greedy tokens like the file expanded to float32."""

from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType as Q

from model_formats.gguf.convert import convert_gguf
from services.pb.cpumesh.v1 import shard_pb2
from tests.service.test_shard_service import (
    NEW_TOKENS,
    ShardGroup,
    drive_greedy,
    shard_group,
)
from tests.unit.gguf_files import hf_model, write_gguf
from tests.unit.test_model import greedy_tp

SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8)


def test_int4_shards_serve_a_gguf_at_its_own_precision(tmp_path: Path) -> None:
    model, weights = hf_model(tmp_path / "hf", "llama", **SHAPES)
    gguf = write_gguf(tmp_path / "m.gguf", "llama", model.config.to_dict(), weights, Q.Q4_1,
                      tensor_types={"model.embed_tokens.weight": Q.F32})
    linked = convert_gguf(gguf, tmp_path / "linked", link=True)
    expected = [t[:NEW_TOKENS] for t in greedy_tp(linked, 1)[0]]
    with shard_group(linked, 2, tmp_path, extra=("--dtype", "int4")) as (services, addrs):
        group = ShardGroup(addrs)
        ours = drive_greedy(group)
        infos = group.call("Info", shard_pb2.ShardInfoRequest())
        group.close()
        logs = [s.log_tail(200) for s in services]
    assert all(i.dtype == "int4" for i in infos)
    assert all("Q4_1 -> int4 g32 (its own blocks)" in log for log in logs), logs[0]
    # Free-running greedy: one bf16-decided token (see test_quant.TINY_AGREEMENT) changes all
    # that follow, so only the first two of each sequence are compared (the numbers are
    # test_gguf_quant's, teacher-forced)
    assert [t[:2] for t in ours] == [t[:2] for t in expected], (ours, expected)
