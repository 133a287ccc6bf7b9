"""GGUF files: metadata → config.json (config), tensors → safetensors (convert), and the
vocabulary → tokenizer.json (tokenizer)."""
