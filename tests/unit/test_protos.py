"""The wire contract: generated code imports and round-trips, every element is documented, and
`services.pb` refuses to import code generated from other protos."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from services import protogen
from services.pb.cpumesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

REPO = Path(__file__).resolve().parents[2]


def test_generated_modules_live_in_the_services_pb_package() -> None:
    assert shard_pb2.__name__ == "services.pb.cpumesh.v1.shard_pb2"
    assert shard_pb2.DESCRIPTOR.name == "cpumesh/v1/shard.proto"  # source names kept
    assert shard_pb2.DESCRIPTOR.package == "cpumesh.v1"
    for path in (REPO / "services" / "pb").rglob("*.py*"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) cpumesh\b", text, re.M), path
    for name in ("ShardServiceStub", "ShardServiceServicer", "add_ShardServiceServicer_to_server"):
        assert hasattr(shard_pb2_grpc, name)
    assert hasattr(tokenizer_pb2_grpc, "TokenizerServiceStub")
    assert hasattr(router_pb2_grpc, "RouterServiceStub")


def test_services_have_the_agreed_methods() -> None:
    def methods(module: object, service: str) -> dict[str, bool]:
        desc = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
        assert not any(m.client_streaming for m in desc.methods)
        return {m.name: m.server_streaming for m in desc.methods}

    assert methods(tokenizer_pb2, "TokenizerService") == {
        "Encode": False, "Decode": False, "DetokenizeBatch": False, "Info": False}
    assert methods(shard_pb2, "ShardService") == {
        "Info": False, "Step": False, "Release": False, "Reset": False}
    assert methods(router_pb2, "RouterService") == {"Generate": True, "ModelInfo": False}


def test_messages_round_trip_with_presence_where_it_matters() -> None:
    step = shard_pb2.StepRequest(
        step_id=7,
        prefill=[shard_pb2.PrefillSeq(seq_id=2**63 + 1, token_ids=[1, 2, 3], top_k=4)],
        extend=[shard_pb2.ExtendSeq(seq_id=5, token_id=9, top_k=1, temperature=0.7)])
    assert shard_pb2.StepRequest.FromString(step.SerializeToString()) == step

    sampling = router_pb2.SamplingParams()
    assert not sampling.HasField("seed") and not sampling.HasField("temperature")
    sampling.seed, sampling.temperature = 0, 0.0  # zero is a real setting: greedy, seed 0
    parsed = router_pb2.SamplingParams.FromString(sampling.SerializeToString())
    assert parsed.HasField("seed") and parsed.HasField("temperature")
    assert not shard_pb2.ResetRequest().HasField("next_step_id")

    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    request = router_pb2.GenerateRequest(chat=chat, sampling=sampling)
    assert request.WhichOneof("input") == "chat"
    request.prompt = "text"
    assert request.WhichOneof("input") == "prompt"  # a oneof: setting one clears the other
    item = tokenizer_pb2.EncodeItem(text="x")
    assert not item.HasField("add_special_tokens")

    final = router_pb2.GenerateResponse(
        finish_reason=common_pb2.FINISH_REASON_STOP, stop_token_id=2,
        usage=common_pb2.Usage(prompt_tokens=3, generated_tokens=1))
    assert final.WhichOneof("matched_stop") == "stop_token_id"
    assert common_pb2.FinishReason.Name(final.finish_reason) == "FINISH_REASON_STOP"


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    files = [str(p.relative_to(protogen.PROTO_ROOT)) for p in protogen.proto_files(
        protogen.PROTO_ROOT)]
    assert protoc.main(["protoc", f"-I{protogen.PROTO_ROOT}", "--include_source_info",
                        f"--descriptor_set_out={out}", *files]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_service_method_message_field_and_enum_value_is_documented(
        tmp_path: Path) -> None:
    undocumented = []
    for f in _descriptor_set(tmp_path).file:
        documented = {tuple(loc.path) for loc in f.source_code_info.location
                      if loc.leading_comments.strip()}
        elements: list[tuple[tuple[int, ...], str]] = []
        for i, m in enumerate(f.message_type):  # 4: message_type, 2: field, 8: oneof_decl
            elements.append(((4, i), m.name))
            elements += [((4, i, 2, j), f"{m.name}.{x.name}") for j, x in enumerate(m.field)]
            elements += [((4, i, 8, j), f"{m.name}.{x.name}")
                         for j, x in enumerate(m.oneof_decl) if not x.name.startswith("_")]
        for i, e in enumerate(f.enum_type):  # 5: enum_type, 2: value
            elements.append(((5, i), e.name))
            elements += [((5, i, 2, j), f"{e.name}.{v.name}") for j, v in enumerate(e.value)]
        for i, s in enumerate(f.service):  # 6: service, 2: method
            elements.append(((6, i), s.name))
            elements += [((6, i, 2, j), f"{s.name}.{x.name}") for j, x in enumerate(s.method)]
        undocumented += [f"{f.name}: {name}" for path, name in elements if path not in documented]
    assert not undocumented


def _copy_protos(dst: Path) -> Path:
    shutil.copytree(protogen.PROTO_ROOT, dst)
    return dst


def test_generate_is_idempotent_and_check_detects_stale_and_missing(tmp_path: Path) -> None:
    protos, out = _copy_protos(tmp_path / "protos"), tmp_path / "pb"
    assert protogen.generate(protos, out) is True
    shard = out / "cpumesh" / "v1" / "shard_pb2.py"
    before = shard.stat().st_mtime_ns
    assert protogen.generate(protos, out) is False  # up to date: nothing rewritten
    assert shard.stat().st_mtime_ns == before
    protogen.check_generated(out, protos)

    with (protos / "cpumesh" / "v1" / "shard.proto").open("a") as f:
        f.write("\n// a changed contract\n")
    with pytest.raises(ImportError, match=r"stale.*make protos"):
        protogen.check_generated(out, protos)
    assert protogen.generate(protos, out) is True
    protogen.check_generated(out, protos)

    (out / "cpumesh" / "v1" / "router_pb2_grpc.py").unlink()
    with pytest.raises(ImportError, match=r"missing cpumesh/v1/router_pb2_grpc.py.*make protos"):
        protogen.check_generated(out, protos)
    assert protogen.generate(protos, out) is True

    (out / protogen.HASH_FILE).unlink()
    with pytest.raises(ImportError, match=r"missing.*make protos"):
        protogen.check_generated(out, protos)
    assert protogen.generate(protos, out) is True  # missing hash → regenerated
    shutil.rmtree(protos)
    protogen.check_generated(out, protos)  # an installed package has no protos/: presence only


def _import_in(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("from services.pb.cpumesh.v1 import shard_pb2_grpc, router_pb2\n"
            "print(router_pb2.__file__)")
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_importing_services_pb_fails_when_the_protos_changed(tmp_path: Path) -> None:
    """The real `services/pb/__init__.py`, in a copy of the source tree, in a fresh process."""
    tree = tmp_path / "tree"
    (tree / "services" / "pb").mkdir(parents=True)
    for rel in ("services/__init__.py", "services/protogen.py", "services/pb/__init__.py"):
        shutil.copy(REPO / rel, tree / rel)
    _copy_protos(tree / "protos")

    missing = _import_in(tree)
    assert missing.returncode != 0 and "missing" in missing.stderr, missing.stderr
    assert "make protos" in missing.stderr

    gen = subprocess.run([sys.executable, "-m", "services.protogen"], cwd=tree,
                         capture_output=True, text=True, timeout=120, check=False)
    assert gen.returncode == 0, gen.stderr
    fresh = _import_in(tree)
    assert fresh.returncode == 0, fresh.stderr
    assert Path(fresh.stdout.strip()).is_relative_to(tree)  # the copy, not the real checkout

    with (tree / "protos" / "cpumesh" / "v1" / "common.proto").open("a") as f:
        f.write("\nmessage Added {}\n")
    stale = _import_in(tree)
    assert stale.returncode != 0 and "ImportError" in stale.stderr, stale.stderr
    assert "stale" in stale.stderr and "make protos" in stale.stderr
