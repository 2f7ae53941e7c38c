"""The model stage: the embedded tiny default, loading with quantization, and LoRA."""
