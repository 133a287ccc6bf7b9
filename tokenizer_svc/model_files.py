"""What a model directory says about its tokenizer, read and built the way `transformers` does.

`tokenizer.json` is the tokenizer itself. Around it: `tokenizer_config.json` (named special tokens,
`add_bos_token`/`add_eos_token`, cleanup, the chat template), `special_tokens_map.json` (older
checkpoints), `chat_template.jinja` (newer ones: it wins over the config's template), and
`config.json` / `generation_config.json` (the model's vocabulary size and its end-of-sequence ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from services.errors import CheckpointError

# The named special tokens transformers passes to chat templates (`SPECIAL_TOKENS_ATTRIBUTES`).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token")


@dataclass(frozen=True)
class ModelFiles:
    """The tokenizer-related contents of one model directory."""

    tokenizer_json: str
    # name ("bos_token", ...) → token text, as set in the config
    special_tokens: dict[str, str] = field(default_factory=dict)
    # extra special tokens as AddedToken keyword arguments ({"content": ..., "lstrip": ...})
    extra_special_tokens: list[dict[str, Any]] = field(default_factory=list)
    # tokenizer_config's `added_tokens_decoder` entries, as AddedToken keyword arguments
    added_tokens: list[dict[str, Any]] = field(default_factory=list)
    add_bos_token: bool | None = None  # None: not set, keep tokenizer.json's post-processor
    add_eos_token: bool | None = None
    clean_up_tokenization_spaces: bool = False
    clean_up_even_for_bpe: bool = False
    chat_template: str | None = None
    model_vocab_size: int | None = None
    model_bos_token_id: int | None = None
    model_eos_token_ids: tuple[int, ...] = ()


def read_model_files(model_dir: Path) -> ModelFiles:
    """Read a model directory; `CheckpointError` naming the file when one is missing or broken."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json")
    config = _json(model_dir / "tokenizer_config.json")
    for name, value in _json(model_dir / "special_tokens_map.json").items():
        config.setdefault(name, value)  # tokenizer_config.json wins
    special = {name: _content(config[name]) for name in NAMED_SPECIAL_TOKENS
               if config.get(name) is not None}
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    if isinstance(extra, dict):  # transformers 5 also allows named extra tokens
        extra = list(extra.values())
    model = _json(model_dir / "config.json")
    generation = _json(model_dir / "generation_config.json")
    eos = [*_ids(model.get("eos_token_id")), *_ids(generation.get("eos_token_id"))]
    bos = model.get("bos_token_id")
    vocab_size = model.get("vocab_size")
    return ModelFiles(
        tokenizer_json=_text(path),
        special_tokens=special,
        extra_special_tokens=[_added_token(t) for t in extra],
        added_tokens=[_added_token(t) for t in (config.get("added_tokens_decoder") or {}).values()],
        add_bos_token=_optional_bool(config.get("add_bos_token")),
        add_eos_token=_optional_bool(config.get("add_eos_token")),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        clean_up_even_for_bpe=bool(config.get(
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)),
        chat_template=_chat_template(model_dir, config),
        model_vocab_size=vocab_size if isinstance(vocab_size, int) else None,
        model_bos_token_id=bos if isinstance(bos, int) else None,
        model_eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def build_backend(files: ModelFiles) -> Backend:
    """The `tokenizers` tokenizer of `files`, as transformers' `TokenizersBackend` sets it up: no
    padding or truncation; the config's named, extra and `added_tokens_decoder` tokens added;
    BOS/EOS around each sequence as `add_bos_token`/`add_eos_token` say, when the config says."""
    try:
        backend = Backend.from_str(files.tokenizer_json)
    except Exception as e:  # the library reports a bad file as a bare Exception
        raise CheckpointError(f"tokenizer.json cannot be loaded: {e}") from e
    backend.no_padding()
    backend.no_truncation()
    known = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
    for spec in files.added_tokens:
        if spec.get("content") and spec["content"] not in known:
            add = backend.add_special_tokens if spec.get("special") else backend.add_tokens
            add([AddedToken(**spec)])
    named = [{"content": t, "normalized": False} for t in files.special_tokens.values()]
    tokens = [AddedToken(**{**spec, "special": True})
              for spec in named + files.extra_special_tokens]
    if tokens:
        backend.add_special_tokens(tokens)
    if (files.add_bos_token is not None or files.add_eos_token is not None
            or backend.post_processor is None):
        backend.post_processor = _post_processor(backend, files)
    return backend


def _post_processor(backend: Backend, files: ModelFiles) -> processors.PostProcessor:
    """transformers' `update_post_processor`."""
    ends: list[tuple[str, int] | None] = []
    for name, add in (("bos_token", files.add_bos_token), ("eos_token", files.add_eos_token)):
        token = files.special_tokens.get(name)
        token_id = backend.token_to_id(token) if token is not None else None
        ends.append((token, token_id) if add and token is not None and token_id is not None
                    else None)
    bos, eos = ends

    def template(sequence: str, type_id: int) -> list[str]:
        return ([f"{bos[0]}:{type_id}"] if bos else []) + [f"${sequence}:{type_id}"] + (
            [f"{eos[0]}:{type_id}"] if eos else [])

    single = " ".join(template("A", 0))
    pair = " ".join(template("A", 0) + template("B", 1))
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[e for e in ends if e is not None])


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return _text(jinja)
    template = config.get("chat_template")
    if template is None:
        template = _json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{model_dir}: chat_template is not a string")
    return template


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _content(token: Any) -> str:
    """A special token's text: configs write it as a string or as a serialized AddedToken."""
    return str(token["content"]) if isinstance(token, dict) else str(token)


def _added_token(token: Any) -> dict[str, Any]:
    if not isinstance(token, dict):
        return {"content": str(token), "special": True, "normalized": False}
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    return {k: token[k] for k in keys if k in token}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)
