"""Llama-family decoders (Llama, Mistral, Qwen2) and their weight loader."""
