import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraforge.config import LoraSettings, ModelSettings
from loraforge.errors import UserError
from loraforge.model.load import resolve_base, resolve_dtype
from loraforge.model.lora import attach_lora, count_parameters, resolve_targets


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_auto_dtype_is_fp32_on_the_cpu():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(UserError, match="float16 needs a CUDA GPU"):
        resolve_dtype("float16", "cpu")


def test_auto_dtype_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") is torch.float16  # a T4
    with pytest.raises(UserError, match="no bfloat16"):
        resolve_dtype("bfloat16", "cuda")


def test_targets_resolve_on_a_llama_module_tree(llama):
    assert resolve_targets(llama, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets(llama, "all-linear") == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"]
    assert resolve_targets(llama, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match=r"\['qproj'\] not found"):
        resolve_targets(llama, ["qproj"])


def test_lora_trains_only_adapters_in_fp32(llama):
    model = attach_lora(llama, LoraSettings(r=4, targets="attention"), gradient_checkpointing=False)
    trainable, total = count_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # 2 layers x 4 projections x (A + B); q/o are 32->32, k/v are 32->16 (2 kv heads of 8)
    assert trainable == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert total > trainable


def test_model_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_base(ModelSettings(base=str(tmp_path)))


def test_missing_local_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_base(ModelSettings(base=str(tmp_path / "nope")))
