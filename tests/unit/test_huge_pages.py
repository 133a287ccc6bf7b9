"""The weights' huge-page arena (shard_svc/huge_pages.py): the same values, views still views,
the memory advised into huge pages, and a model on it that answers as transformers does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model_formats.checkpoint import load_model_config
from shard_svc import huge_pages
from shard_svc.kernels import choose_kernels
from shard_svc.mesh.communicator import SingleRank
from shard_svc.model import ShardModel, make_batch
from shard_svc.quant import Int8Weight
from shard_svc.quant_groups import Int8GroupWeight
from shard_svc.sharding import plan_shard
from shard_svc.weights import ShardWeights, load_shard_weights
from tests.checkpoints import tiny_checkpoint
from tests.unit.test_model import PROMPTS, reference

# Large enough for an arena (the embedding alone is 4 MB in float32), small enough to be quick
SHAPES = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=8,
              num_key_value_heads=2, head_dim=32)

needs_thp = pytest.mark.skipif(not huge_pages.available(),
                               reason="this kernel offers no transparent huge pages")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("huge"), "llama",
                           tie_word_embeddings=request.param, **SHAPES)


def weights(path: Path, dtype: torch.dtype = torch.float32) -> ShardWeights:
    config = load_model_config(path)
    return load_shard_weights(path, config, plan_shard(config, 0, 1), dtype)


def tensors(w: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in the weights' dataclasses by its path (independent of the module's walk)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in vars(w).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                out |= tensors(item, f"{prefix}{name}.{i}.")
        elif hasattr(value, "__dataclass_fields__"):
            out |= tensors(value, f"{prefix}{name}.")
    return out


def mapping(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
            if inside:
                fields["range"] = head
        elif inside:
            fields[head.rstrip(":")] = rest.strip()
    return fields


@needs_thp
def test_adopt_keeps_values_and_views_and_advises_one_mapping(checkpoint: Path) -> None:
    w = weights(checkpoint)
    before = {k: t.clone() for k, t in tensors(w).items()}
    tied = load_model_config(checkpoint).tie_word_embeddings
    assert (tensors(w)["lm_head"].data_ptr() == tensors(w)["embed"].data_ptr()) == tied
    assert huge_pages.adopt(w) is w and w.huge_pages
    after = tensors(w)
    assert after.keys() == before.keys()
    for k, t in after.items():
        assert torch.equal(t, before[k]), k
        assert t.dtype == before[k].dtype and t.stride() == before[k].stride(), k
    embed, head = after["embed"], after["lm_head"]
    assert (head.data_ptr() == embed.data_ptr()) == tied
    if tied:  # still one table: a write through one is seen through the other
        embed[0, 0] += 1
        assert head[0, 0] == embed[0, 0]
    assert len({mapping(t.data_ptr())["range"] for t in after.values()}) == 1, "one arena"
    smaps = mapping(embed.data_ptr())
    assert smaps.get("THPeligible") == "1", smaps
    backed = int(smaps["AnonHugePages"].split()[0]) * 1024
    assert huge_pages.backed_bytes(embed.data_ptr()) == backed
    pointers = {k: t.data_ptr() for k, t in after.items()}
    huge_pages.adopt(w)  # again: nothing moves
    assert {k: t.data_ptr() for k, t in tensors(w).items()} == pointers


@needs_thp
def test_an_empty_tensor_stays_where_it_is(checkpoint: Path) -> None:
    w = weights(checkpoint)
    empty = torch.empty(0)
    w.layers[0].qkv_bias = empty
    assert huge_pages.adopt(w).huge_pages
    assert w.layers[0].qkv_bias is empty


@needs_thp
def test_zeros_are_zeros_in_huge_pages_from_2_mib() -> None:
    big = huge_pages.zeros((2, 3, 4096, 64), torch.bfloat16)
    assert big.shape == (2, 3, 4096, 64) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert not big.any()
    assert mapping(big.data_ptr()).get("THPeligible") == "1"
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0
    big[1, 2, 4095, 63] = 3.0  # writable to its last element
    assert big.sum() == 3.0
    small = huge_pages.zeros((3, 5), torch.float32)
    assert torch.equal(small, torch.zeros(3, 5))


def test_small_weights_and_no_thp_stay_where_they_are(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    small = weights(tiny_checkpoint(tmp_path / "small"))  # ~0.5 MB: no arena
    pointers = {k: t.data_ptr() for k, t in tensors(small).items()}
    assert not huge_pages.adopt(small).huge_pages
    assert {k: t.data_ptr() for k, t in tensors(small).items()} == pointers
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    assert not huge_pages.available()
    big = weights(tiny_checkpoint(tmp_path / "big", **SHAPES))
    pointers = {k: t.data_ptr() for k, t in tensors(big).items()}
    assert not huge_pages.adopt(big).huge_pages
    assert {k: t.data_ptr() for k, t in tensors(big).items()} == pointers


@needs_thp
def test_model_on_the_arena_answers_as_transformers(checkpoint: Path) -> None:
    ref_tokens, ref_logits = reference(checkpoint)
    config = load_model_config(checkpoint)
    model = ShardModel(config, plan_shard(config, 0, 1), weights(checkpoint), SingleRank())
    assert model.w.huge_pages
    cache = model.new_cache(capacity_tokens=16384, page_size=4)  # K and V 8 MB each
    assert mapping(cache.store.k.data_ptr()).get("THPeligible") == "1"
    steps = list(enumerate(PROMPTS))
    for i, _ in steps:
        cache.add(i)
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    for n in range(len(ref_tokens[0]) + 1):
        logits = model.local_logits(model.forward(make_batch(steps, cache), cache))
        for i in range(len(PROMPTS)):
            torch.testing.assert_close(logits[i], ref_logits[i][n], rtol=1e-4, atol=1e-4)
            tokens[i].append(int(logits[i].argmax()))
        steps = [(i, [t[-1]]) for i, t in enumerate(tokens)]
    assert [t[:-1] for t in tokens] == ref_tokens


@needs_thp
def test_int8_blocked_model_equals_itself_off_the_arena(checkpoint: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """cpumesh's int8 kernels reading blocked codes from the arena (int8 in groups, and per row
    where a matrix's shape takes no groups), an int8 KV cache in huge pages: the very same
    logits as both in torch's own allocations."""
    config = load_model_config(checkpoint)
    logits = []
    for arena in (True, False):
        with monkeypatch.context() as m:
            if not arena:
                m.setattr(huge_pages, "available", lambda: False)
            w = weights(checkpoint, torch.int8)
            plan = choose_kernels("cpumesh", w.embed.dtype, [layer.gate_up for layer in w.layers])
            model = ShardModel(config, plan_shard(config, 0, 1), w, SingleRank(), plan)
            assert model.w.huge_pages == arena
            assert isinstance(model.w.lm_head, Int8Weight | Int8GroupWeight)
            assert model.w.lm_head.blocked
            cache = model.new_cache(capacity_tokens=65536, page_size=4, kv_dtype=torch.int8)
            if arena:  # (torch's own allocations may land in a region others advised)
                assert mapping(cache.store.k.data_ptr()).get("THPeligible") == "1"
            steps = list(enumerate(PROMPTS))
            for i, _ in steps:
                cache.add(i)
            out = []
            for _ in range(4):
                out.append(model.local_logits(model.forward(make_batch(steps, cache), cache)))
                steps = [(i, [int(t)]) for i, t in enumerate(out[-1].argmax(-1))]
            logits.append(torch.stack(out))
    assert torch.equal(logits[0], logits[1])


CHILD = """
import os, sys
from services.cli import main
try:
    main(["shard", "--help"])
except SystemExit:
    pass
import torch
from tests.unit.test_huge_pages import mapping
t = torch.empty(4 << 20, dtype=torch.uint8)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), mapping(t.data_ptr()).get("THPeligible"))
"""


@needs_thp
@pytest.mark.parametrize("operator", [None, "0"])
def test_the_shard_command_puts_torchs_large_allocations_in_huge_pages(
        operator: str | None) -> None:
    """`cpumesh shard` turns on torch's huge-page allocator (allocations of 2 MiB and more
    advised) before torch's first allocation, unless the operator set it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if operator is not None:
        env["THP_MEM_ALLOC_ENABLE"] = operator
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()[-2:]
    assert out == (["1", "1"] if operator is None else [operator, "0"])
