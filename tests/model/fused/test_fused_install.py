"""Switching the fused path on: what runs where, what `auto` says when a fast path is off, and that every
shipped recipe gets the fused path on CUDA with no fallback."""
import types

import pytest
import torch

from fused_helpers import QUIET, rows, tiny_lora_model, train_cfg
from loraforge.config import TrainSettings, list_recipes, load_config
from loraforge.errors import UserError
from loraforge.model.fused import apply_fast_paths, attention_kernels, support, why_unsupported
from loraforge.train.loop import micro_batch_loss
from loraforge.train.plan import collate_packed, trained_tokens


def test_switches_stay_off_where_they_cannot_run_and_say_why():
    model = tiny_lora_model()
    said = []
    report = apply_fast_paths(model, TrainSettings(), "cpu", said.append)  # auto: CUDA only
    assert report.on == [] and "no CUDA GPU" in report.off["fused layers"]
    assert len(said) == 1 and said[0].startswith("fast paths off: fused layers")
    with pytest.raises(UserError, match="liger_kernels"):
        apply_fast_paths(model, train_cfg(liger_kernels="on"), "cpu", QUIET)
    with pytest.raises(UserError, match="offload_activations"):
        apply_fast_paths(model, train_cfg(offload_activations="on"), "cpu", QUIET)
    with pytest.raises(UserError, match="offload_activations: on needs the fused path"):
        apply_fast_paths(model, TrainSettings(offload_activations=True), "cpu", QUIET)
    said.clear()
    report = apply_fast_paths(model, train_cfg(), "cpu", said.append)
    assert "fused layers" in report.on and not any("liger" in s for s in report.on)
    assert report.off["liger kernels"] == "no CUDA GPU" and report.off["CPU-offloaded checkpoints"] == "no CUDA GPU"
    assert said[-1] == ("fast paths off: liger kernels (no CUDA GPU); CPU-offloaded checkpoints (no CUDA GPU); "
                        "cuDNN attention (no CUDA GPU)")
    assert model.get_base_model()._loraforge_fast_report is report


def test_unsupported_set_ups_fall_back_with_a_reason_or_refuse():
    model = tiny_lora_model(use_dora=True)
    assert why_unsupported(model) == "DoRA"
    said = []
    report = apply_fast_paths(model, train_cfg(fused_layers="auto"), "cuda", said.append)
    assert report.on == [] and report.off == {"fused layers": "DoRA"}
    assert said == ["fast paths off: fused layers (DoRA); training runs the plain transformers + PEFT forward"]
    with pytest.raises(UserError, match="DoRA"):
        apply_fast_paths(model, train_cfg(), "cpu", QUIET)


@pytest.mark.parametrize("recipe", [r for r in list_recipes()])
def test_every_shipped_recipe_resolves_to_the_fused_path_on_cuda(recipe, monkeypatch):
    """The recipe's own LoRA (dropout, targets, r, alpha) and train keys, no extra settings: on a CUDA
    machine every fast path is on (liger counted as installed, as on the GPU host)."""
    monkeypatch.setattr(support, "liger_ops", lambda: types.SimpleNamespace())
    monkeypatch.setattr(attention_kernels, "cudnn_problem", lambda *a: (None, False))  # as on the H200
    cfg = load_config(recipe)
    model = tiny_lora_model(**{k: getattr(cfg.lora, k) for k in ("r", "alpha", "dropout", "targets", "use_rslora")})
    model.to(torch.bfloat16)  # the compute dtype of every GPU recipe's base
    report = apply_fast_paths(model, cfg.train, "cuda", QUIET)
    assert cfg.train.packing == "auto"  # packs wherever the fused path runs
    assert "fused layers" in report.on and "liger RoPE/SiLU-mul" in report.on
    assert any(s.startswith("cuDNN attention (sequences >= 4096 tokens") for s in report.on)
    assert ("kept activations (attention, q/k/v, up outputs; within copy time)" in report.on) == \
        cfg.train.gradient_checkpointing
    expected_off = {} if cfg.train.gradient_checkpointing else {
        "CPU-offloaded checkpoints": "train.gradient_checkpointing is false"}
    assert report.off == expected_off
    assert ("LoRA dropout in the fused nodes" in report.on) == (cfg.lora.dropout > 0)


def test_attention_kernel_falls_back_to_flash_and_says_why(monkeypatch):
    """Where cuDNN attention cannot run (an older GPU, a failed check), auto runs FlashAttention-2 and says so in
    one line and the report; asking for cudnn there is an error; asking for flash is quiet."""
    monkeypatch.setattr(support, "liger_ops", lambda: types.SimpleNamespace())
    monkeypatch.setattr(attention_kernels, "cudnn_problem", lambda *a: ("needs a Hopper GPU or newer (sm_80)", False))
    model = tiny_lora_model()
    model.to(torch.bfloat16)
    said = []
    report = apply_fast_paths(model, train_cfg(), "cuda", said.append)
    assert "FlashAttention-2 varlen attention" in report.on
    assert report.off["cuDNN attention"] == "needs a Hopper GPU or newer (sm_80); FlashAttention-2 runs"
    assert said[-1] == "fast paths off: cuDNN attention (needs a Hopper GPU or newer (sm_80); FlashAttention-2 runs)"
    with pytest.raises(UserError, match="train.attention_kernel: cudnn, but cuDNN attention does not run here"):
        apply_fast_paths(model, train_cfg(attention_kernel="cudnn"), "cuda", QUIET)
    said.clear()
    report = apply_fast_paths(model, train_cfg(attention_kernel="flash", keep_activations="off"), "cuda", said.append)
    assert "FlashAttention-2 varlen attention" in report.on and not any("kept" in s for s in report.on)
    assert "kept attention" not in report.off
    assert not any("off:" in s for s in said)
    model.to(torch.float32)  # no flash/cuDNN kernel for fp32: per-sequence SDPA, its attention not kept, said
    said.clear()
    report = apply_fast_paths(model, train_cfg(), "cuda", said.append)
    assert "per-sequence SDPA" in report.on and "kept activations (q/k/v, up outputs; within copy time)" in report.on
    assert report.off["kept attention"].startswith("needs the flash or cuDNN kernels' softmax statistics")
    assert "kept attention (needs the flash or cuDNN" in said[-1]


def test_liger_is_used_only_on_cuda_tensors(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(rms_norm=None, rope=None, silu_mul=None)
    monkeypatch.setattr(support, "liger_ops", lambda: calls.append(1) or fake)
    model = tiny_lora_model()
    data = rows()
    apply_fast_paths(model, train_cfg(), "cuda", say=QUIET)  # as on a GPU host...
    assert model.get_base_model()._loraforge_fast.liger and calls
    # ...but these tensors are on the CPU: the torch ops run (the fake kernels would fail if called)
    micro_batch_loss(model, collate_packed(data, 0), trained_tokens(data)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("moved", [True, False], ids=["functions-moved", "functions-found"])
def test_the_direct_nf4_dequantize_says_when_it_is_off(moved, tmp_path, monkeypatch):
    """weights.dense_weight calls bitsandbytes' CUDA functions directly; where this bitsandbytes lays them out
    otherwise it goes through the ops (slower on the host), and `auto` says so in the output and the report."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.config import LoraSettings, ModelSettings
    from loraforge.model.fused import weights
    from loraforge.model.load import load_base_model
    from loraforge.model.lora import attach_lora

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(tmp_path)
    base = load_base_model(ModelSettings(base=str(tmp_path)), torch.float32, "cpu", str(tmp_path))
    model = attach_lora(base, LoraSettings(r=4))
    monkeypatch.setattr(weights, "cuda_impls", lambda: None if moved else ("4bit", "blockwise"))
    said = []
    report = apply_fast_paths(model, train_cfg(), "cuda", said.append)  # as on a GPU host
    assert ("direct NF4 dequantize" in report.off) == moved
    assert any("direct NF4 dequantize (this bitsandbytes'" in s for s in said) == moved
