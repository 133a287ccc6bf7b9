"""Model files: Hugging Face directories (config.json, safetensors, tokenizer files), GGUF files
converted once into that form, and the embedded default model. Used by the shard (weights,
config) and the tokenizer (tokenizer files); no torch, no service package imported."""
