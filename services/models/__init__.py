"""Model code shared by the encoder (vision tower, text embeddings, M-RoPE positions) and the
language's prefill consumer: `qwen` (the encoder model), `qwen_weights` (tiny models and
checkpoints) and `qwen_images` (image tokens) wrap the transformers Qwen2-VL, Qwen2.5-VL,
Qwen3-VL and Qwen3-VL-MoE classes."""
