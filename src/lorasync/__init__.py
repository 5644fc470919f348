"""lorasync: move trained LoRA weights into vLLM after every optimizer step, verified."""
