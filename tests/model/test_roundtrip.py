"""The adapter we save is the adapter we trained: plain PEFT + transformers reload it exactly."""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraforge.config import LoraSettings, ModelSettings
from loraforge.model.load import load_base_model, quantization_config, use_exact_cpu_kernels
from loraforge.model.lora import attach_lora


def test_reloaded_adapter_gives_the_in_memory_outputs(tiny_model_dir, tmp_path):
    settings = ModelSettings(base="tiny")  # NF4 with double quant
    model = attach_lora(load_base_model(settings, torch.float32, "cpu"), LoraSettings(r=8, dropout=0.0),
                        gradient_checkpointing=False)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: every adapter weight moves off its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    model.eval()
    with torch.no_grad():
        in_memory = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config(settings, torch.float32))
    use_exact_cpu_kernels(base)  # bitsandbytes' bf16 CPU inference kernel would differ by ~1e-2 (see its docstring)
    with torch.no_grad():
        plain_base = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=ids).logits
    assert torch.allclose(reloaded, in_memory, rtol=0, atol=1e-5)
    assert not torch.allclose(plain_base, in_memory, atol=1e-3)  # the adapter really does something
