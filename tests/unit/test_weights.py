"""The slice loader: exact slices, sharded checkpoints, clear errors, and bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_formats.checkpoint import load_model_config
from services.errors import CheckpointError
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.checkpoints import tiny_checkpoint


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("qwen"), "qwen2")


def test_slices_equal_the_full_tensors(qwen_dir: Path) -> None:
    full = load_file(qwen_dir / "model.safetensors")
    config = load_model_config(qwen_dir)
    plan = plan_shard(config, 1, 3)  # q head 2 (KV head 0, shared with rank 0), vocab 101..201
    w = load_shard_weights(qwen_dir, config, plan)
    layer = w.layers[1]
    torch.testing.assert_close(layer.wq, full["model.layers.1.self_attn.q_proj.weight"][32:48],
                               rtol=0, atol=0)
    torch.testing.assert_close(layer.bk, full["model.layers.1.self_attn.k_proj.bias"][0:16],
                               rtol=0, atol=0)
    torch.testing.assert_close(layer.wo, full["model.layers.1.self_attn.o_proj.weight"][:, 32:48],
                               rtol=0, atol=0)
    torch.testing.assert_close(layer.w_down, full["model.layers.1.mlp.down_proj.weight"][:, 67:134],
                               rtol=0, atol=0)
    torch.testing.assert_close(w.lm_head, full["lm_head.weight"][101:201], rtol=0, atol=0)
    torch.testing.assert_close(w.embed, full["model.embed_tokens.weight"], rtol=0, atol=0)


def test_sharded_checkpoint_with_index(qwen_dir: Path, tmp_path: Path) -> None:
    full = load_file(qwen_dir / "model.safetensors")
    names = sorted(full)
    files = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, part in files.items():
        save_file({n: full[n] for n in part}, tmp_path / fname)
    index = {"weight_map": {n: f for f, part in files.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((qwen_dir / "config.json").read_text())
    config = load_model_config(tmp_path)
    plan = plan_shard(config, 0, 2)
    a = load_shard_weights(tmp_path, config, plan)
    b = load_shard_weights(qwen_dir, config, plan)
    torch.testing.assert_close(a.layers[0].w_up, b.layers[0].w_up, rtol=0, atol=0)


def test_missing_tensor_is_named(qwen_dir: Path, tmp_path: Path) -> None:
    full = load_file(qwen_dir / "model.safetensors")
    del full["model.layers.1.mlp.up_proj.weight"]
    save_file(full, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((qwen_dir / "config.json").read_text())
    config = load_model_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_shard_weights(tmp_path, config, plan_shard(config, 0, 1))


def test_truncated_safetensors_is_refused(qwen_dir: Path, tmp_path: Path) -> None:
    data = (qwen_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((qwen_dir / "config.json").read_text())
    config = load_model_config(tmp_path)
    with pytest.raises(CheckpointError, match="runs past the end of the file"):
        load_shard_weights(tmp_path, config, plan_shard(config, 0, 1))


def write_big_checkpoint(path: Path, layers: int = 12) -> int:
    """A random Llama checkpoint of about 570 MB written directly (fast); returns its size."""
    h, inter, heads, kv, d, vocab = 1024, 3072, 16, 4, 64, 2048
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d,
              "max_position_embeddings": 1024, "tie_word_embeddings": False}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    tensors = {"model.embed_tokens.weight": r(vocab, h), "lm_head.weight": r(vocab, h),
               "model.norm.weight": r(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
                    p + "self_attn.q_proj.weight": r(heads * d, h),
                    p + "self_attn.k_proj.weight": r(kv * d, h),
                    p + "self_attn.v_proj.weight": r(kv * d, h),
                    p + "self_attn.o_proj.weight": r(h, heads * d),
                    p + "mlp.gate_proj.weight": r(inter, h), p + "mlp.up_proj.weight": r(inter, h),
                    p + "mlp.down_proj.weight": r(h, inter)}
    save_file(tensors, path / "model.safetensors")
    return (path / "model.safetensors").stat().st_size


MEASURE = """
import json, sys
from pathlib import Path
import torch
from model_formats.checkpoint import load_model_config
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights

def rss_mb():  # VmHWM: this image's peak RSS (ru_maxrss would include the pre-exec parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

path = Path(sys.argv[1])
config = load_model_config(path)
plan = plan_shard(config, 1, 2)
before = rss_mb()
w = load_shard_weights(path, config, plan)
held = sum(t.numel() * t.element_size() for l in w.layers for t in vars(l).values()
           if isinstance(t, torch.Tensor)) + w.embed.nbytes + w.lm_head.nbytes + w.final_norm.nbytes
print(json.dumps({"before_mb": before, "peak_mb": rss_mb(), "held_mb": held / 2**20}))
"""


def test_rank_slice_peak_memory(tmp_path: Path) -> None:
    """Loading rank 1 of 2 adds less than 0.6 × the checkpoint size to the process's peak RSS.

    The process itself (interpreter, torch) takes ~220 MB before any weight is read; that
    baseline is measured in the same process and reported, and the bound is on what the load
    adds on top of it.
    """
    size = write_big_checkpoint(tmp_path / "big")
    assert size > 300e6
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big")],
                         capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(out.stdout)
    added = m["peak_mb"] - m["before_mb"]
    size_mb = size / 2**20
    print(f"checkpoint {size_mb:.0f} MB, held slice {m['held_mb']:.0f} MB, "
          f"peak RSS {m['peak_mb']:.0f} MB (baseline {m['before_mb']:.0f} MB, load added "
          f"{added:.0f} MB = {added / size_mb:.2f} × checkpoint)")
    assert m["held_mb"] < 0.55 * size_mb  # really a slice, not the whole model
    assert added < 0.6 * size_mb
