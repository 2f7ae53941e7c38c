"""loraforge: QLoRA fine-tuning for Llama-family chat models.

Pipeline, one subpackage per stage: config -> data -> model -> train -> export / infer / evaluate.
"""
__version__ = "0.1.0"
