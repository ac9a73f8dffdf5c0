"""Model code shared by the encoder (vision tower, text embeddings, M-RoPE positions) and the
language's prefill consumer: `qwen` wraps the transformers Qwen2-VL classes."""
