from pathlib import Path

import pytest
import yaml

from loraforge.config import RunConfig, apply_overrides, list_recipes, load_config, resolve_recipe
from loraforge.errors import UserError


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_give_the_real_model_on_the_bundled_sql_task():
    cfg = load_config(None)
    assert cfg.model.base == "smollm2-135m-instruct" and cfg.data.datasets[0].path.endswith("assets/sql_demo.jsonl")
    assert cfg.model.quantization == "nf4" and cfg.eval.metrics == ["loraforge.evaluate.sql:execution_match"]
    tiny = load_config("tiny")
    assert tiny.model.base == "tiny" and tiny.data.datasets is None and tiny.eval.metrics == []


def test_shipped_recipes_find_their_bundled_data_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(load_config("demo").data.datasets[0].path).is_file()


def test_every_error_is_reported_at_once_with_its_key_path(tmp_path):
    path = write(tmp_path, {"model": {"quantization": "nf5"}, "lora": {"r": 0, "dropout": 1.5},
                            "train": {"learning_rate": -1, "optimiser": "adamw"}})
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert "5 problem(s)" in msg
    for key in ("model.quantization", "lora.r", "lora.dropout", "train.learning_rate", "train.optimiser"):
        assert f"  - {key}:" in msg
    assert "did you mean 'optimizer'" in msg


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"  - trian: unknown key; did you mean 'train'"):
        load_config(write(tmp_path, {"trian": {"max_steps": 3}}))


def test_bad_value_names_the_value(tmp_path):
    with pytest.raises(UserError, match=r"lora.targets.*'everything'"):
        load_config(write(tmp_path, {"lora": {"targets": "everything"}}))


def test_overrides_are_typed_and_nested():
    cfg = load_config("demo", ["train.max_steps=20", "lora.r=8", "lora.targets=[q_proj, v_proj]",
                               "data.system_prompt=Be brief."])
    assert cfg.train.max_steps == 20 and cfg.lora.r == 8
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.data.system_prompt == "Be brief."


def test_override_of_unknown_key_is_reported():
    with pytest.raises(UserError, match=r"train.max_step: unknown key; did you mean 'max_steps'"):
        load_config("demo", ["train.max_step=3"])


def test_override_needs_key_value():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.max_steps"])


def test_early_stopping_needs_eval_steps(tmp_path):
    with pytest.raises(UserError, match="early_stopping_patience: needs train.eval_steps"):
        load_config(write(tmp_path, {"train": {"early_stopping_patience": 2}}))


def test_unknown_recipe_suggests_a_close_name():
    with pytest.raises(UserError, match="Did you mean 'demo'"):
        resolve_recipe("dmeo")


def test_missing_config_file():
    with pytest.raises(UserError, match="config file nowhere.yaml not found"):
        resolve_recipe("nowhere.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(str(path))


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.description, f"recipe {name} needs a one-line description"


def test_shipped_recipes_match_the_issue():
    g = load_config("llama2-7b-guanaco")
    assert (g.lora.r, g.lora.alpha, g.lora.dropout, g.model.quantization) == (64, 16, 0.1, "nf4")
    assert (g.train.optimizer, g.train.learning_rate, g.train.lr_scheduler) == ("paged_adamw_32bit", 2e-4, "constant")
    assert (g.train.warmup_ratio, g.train.weight_decay, g.train.max_grad_norm, g.train.epochs) == (0.03, 0.001, 0.3, 1)
    assert g.train.group_by_length
    h = load_config("llama2-7b-human-response")
    assert (h.lora.r, h.lora.alpha, h.lora.dropout, h.lora.targets) == (8, 32, 0.05, "attention")
    assert h.data.template == "human_response" and h.model.double_quant and h.model.compute_dtype == "bfloat16"
    assert (h.train.max_grad_norm, h.train.epochs) == (0.3, 3)
    s = load_config("llama2-7b-sql-mix")
    assert len(s.data.datasets) == 3 and [d.format for d in s.data.datasets][1:] == ["input_output"] * 2
    assert (s.lora.r, s.lora.alpha, s.lora.targets) == (8, 64, "all-linear")
    assert (s.train.optimizer, s.train.learning_rate, s.train.max_steps) == ("paged_adamw_8bit", 1e-4, 20)
    c = load_config("llama2-7b-chat-system")
    assert c.model.compute_dtype == "float16" and c.data.system_prompt and c.data.template == "llama2"


def test_saved_config_never_holds_the_hub_token():
    cfg = load_config("demo", ["model.hub_token=hf_secret123"])
    assert cfg.model.hub_token == "hf_secret123"
    assert "hf_secret123" not in yaml.safe_dump(cfg.saved_dict())


def test_fast_path_contradictions_fail_at_load_time_all_at_once(monkeypatch):
    """Config-only cross-checks fail while the config loads - before any tokenizer or weights - and
    all of them together, each with its key path."""
    import loraforge.model.load as load

    monkeypatch.setattr(load, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UserError) as err:
        load_config("tiny", ["train.fused_layers=off", "train.liger_kernels=on", "train.offload_activations=on",
                             "train.gradient_checkpointing=false", "train.early_stopping_patience=2",
                             "train.eval_steps=null"])
    text = str(err.value)
    assert "4 problem(s)" in text
    for line in ("train.liger_kernels: on needs the fused path, but train.fused_layers is off",
                 "train.offload_activations: on needs the fused path, but train.fused_layers is off",
                 "train.offload_activations: on offloads the layer checkpoints, so it needs",
                 "train.early_stopping_patience: needs train.eval_steps"):
        assert f"  - {line}" in text
    with pytest.raises(UserError, match="train.fused_layers: on does not run DoRA"):
        load_config("tiny", ["train.fused_layers=on", "lora.use_dora=true"])
def test_attention_settings_need_the_fused_path_and_checkpoints():
    with pytest.raises(UserError) as err:
        load_config("tiny", ["train.fused_layers=off", "train.attention_kernel=cudnn", "train.keep_activations=on"])
    assert "train.keep_activations: on needs the fused path, but train.fused_layers is off" in str(err.value)
    assert "train.attention_kernel: cudnn is the fused path's, but train.fused_layers is off" in str(err.value)
    with pytest.raises(UserError, match="train.keep_activations: on keeps activations for the checkpoints' recompute, so "
                                        "it needs train.gradient_checkpointing: true"):
        load_config("tiny", ["train.keep_activations=on", "train.gradient_checkpointing=false"])
    cfg = load_config("tiny", ["train.keep_activations=off", "train.attention_kernel=flash"])
    assert (cfg.train.keep_activations, cfg.train.attention_kernel) == ("off", "flash")


def test_distributed_settings_that_cannot_work_together_are_refused():
    assert load_config("tiny", ["train.distributed=fsdp", "train.fsdp_cpu_offload=true"]).train.distributed == "fsdp"
    with pytest.raises(UserError, match=r"train.fsdp_cpu_offload: needs train.distributed: fsdp"):
        load_config("tiny", ["train.fsdp_cpu_offload=true"])
    with pytest.raises(UserError, match=r"train.fused_layers: on needs the fused forward.*fsdp"):
        load_config("tiny", ["train.distributed=fsdp", "train.fused_layers=on"])
    with pytest.raises(UserError, match=r"train.distributed: .*'zero3'"):
        load_config("tiny", ["train.distributed=zero3"])
