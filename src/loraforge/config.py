"""Typed run configuration: YAML + `--set key=value` overrides, validated before anything heavy loads.

Every error is reported at once with its key path (`train.learning_rate: ...`); unknown keys are
errors, with a "did you mean" hint.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from loraforge import config_messages
from loraforge.config_rules import cross_check
from loraforge.config_messages import (CROSS_CHECK_MARK, TRUST_FLAG, leaf_types, redacted_override,  # noqa: F401
                                       remote_code_refusal, without_secrets)
from loraforge.errors import UserError

PACKAGE_DIR = Path(__file__).parent
RECIPES_DIR = PACKAGE_DIR / "recipes"

Quantization = Literal["nf4", "fp4", "int8", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Template = Literal["llama2", "human_response", "alpaca", "chatml", "llama3", "tokenizer"]
Shape = Literal["auto", "text", "instruction", "input_output", "messages", "tokens"]
TEMPLATE_NAMES: tuple[str, ...] = get_args(Template)  # the one list of chat templates (data.templates builds them)
FORMAT_NAMES: tuple[str, ...] = get_args(Shape)  # dataset shapes a source's `format` may name
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
Scheduler = Literal["constant", "cosine", "linear"]
LORA_TARGET_GROUPS = ("attention", "all-linear")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v, info):
        # pydantic's lax mode reads `true` as 1 for a number; `micro_batch_size: true` is a mistake.
        if isinstance(v, bool):
            ann = cls.model_fields[info.field_name].annotation
            if bool not in leaf_types(ann) and leaf_types(ann) & {int, float}:
                raise ValueError("expected a number, not true/false")
        return v


class ModelSettings(Section):
    base: Optional[str] = Field(None, description="Local directory or Hub id; 'smollm2-135m-instruct' (the default "
                                "when left out) or 'tiny' (random weights) for the built-in models.")
    revision: Optional[str] = None
    quantization: Quantization = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "auto"
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False  # a record that the model needs its own code: it runs only with the flag
    hub_token: Optional[str] = Field(None, description="Hub token; never written to disk or logs. Prefer HF_TOKEN.")
    _remote_code_allowed: bool = PrivateAttr(False)  # this command line's --trust-remote-code, never a file's

    @property
    def remote_code_allowed(self) -> bool:
        return self._remote_code_allowed


class LoraSettings(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: Union[Literal["attention", "all-linear"], list[str]] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False

    @field_validator("targets")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or 'attention' / 'all-linear'")
        return v


class DatasetSource(Section):
    path: str = Field(..., description="Hub id, local file (.jsonl/.json/.csv/.parquet), save_to_disk folder or glob.")
    format: Shape = "auto"
    split: str = "train"
    subset: Optional[str] = None
    revision: Optional[str] = None
    columns: dict[str, str] = Field(default_factory=dict, description="Our field name -> the dataset's column name.")
    weight: Optional[float] = Field(None, gt=0, description="Sampling weight when data.mix is 'weighted'.")
    max_rows: Optional[int] = Field(None, gt=0)
    system_prompt: Optional[str] = None
    trust_remote_code: bool = False  # a record, as model.trust_remote_code
    _remote_code_allowed: bool = PrivateAttr(False)

    @property
    def remote_code_allowed(self) -> bool:
        return self._remote_code_allowed


class DataSettings(Section):
    datasets: Optional[list[DatasetSource]] = Field(None, description="Leave out for the bundled dataset.")
    template: Template = "llama2"
    system_prompt: Optional[str] = None
    max_length: int = Field(512, gt=8)
    allow_beyond_context: bool = Field(False, description="Allow max_length above the model's context (config.json "
                                       "max_position_embeddings, with its RoPE scaling): for models known to extrapolate.")
    train_on: Literal["responses", "all"] = "responses"
    truncation: Literal["truncate", "drop"] = "truncate"
    mix: Literal["concat", "weighted"] = "concat"
    mix_size: Optional[int] = Field(None, gt=0, description="Rows drawn when mix is 'weighted'; default: all sources' rows.")
    eval_split: Optional[str] = Field(None, description="Use this existing split of the first source for evaluation.")
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    eval_size: Optional[int] = Field(None, gt=0)
    seed: int = 0

    @field_validator("datasets")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and not v:
            raise ValueError("list at least one dataset, or leave 'datasets' out for the bundled one")
        return v


class TrainSettings(Section):
    epochs: float = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(4, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Scheduler = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    optimizer: Optimizer = "adamw"
    gradient_checkpointing: bool = True
    group_by_length: bool = False
    shuffle: bool = Field(True, description="Shuffle rows each epoch; off keeps file order (the benchmark's rule).")
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Concatenate each micro-batch's rows into one padding-free stream (positions restart per "
        "sequence, no attention across sequences; the same loss); auto: on with the fused path, where it is faster.")
    # Speed and memory only: what is learned stays the same (tests/model/fused/).
    fused_layers: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused Llama training forward (model/fused/); auto: on for supported models on CUDA.")
    liger_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="liger-kernel's Triton RoPE/SiLU-mul in the fused forward; auto: where installed, on CUDA.")
    offload_activations: Literal["auto", "on", "off"] = Field(
        "auto", description="Keep layer checkpoints in pinned CPU memory; auto: on with the fused path and checkpointing.")
    attention_kernel: Literal["auto", "cudnn", "flash"] = Field(
        "auto", description="Fused path's attention: auto: cuDNN for sequences of 4096+ tokens on Hopper or newer "
        "(where its check passes), FlashAttention-2 for the rest; cudnn: the same, an error where it cannot run.")
    keep_activations: Literal["auto", "on", "off"] = Field(
        "auto", description="Checkpoints keep attention outputs + softmax statistics, q/k/v and up-projection outputs "
        "(where the checkpoints go), so the recompute skips them; auto: what the copy engine moves while a layer "
        "computes (offloaded, steps of 4096+ tokens), or long sequences' attention (on the device).")
    max_tokens_per_micro_batch: Optional[int] = Field(
        None, gt=0, description="Split a micro-batch's rows further so each part holds at most this many tokens.")

    @field_validator("packing", "fused_layers", "liger_kernels", "offload_activations", "keep_activations", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):  # YAML reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: Optional[int] = Field(None, gt=0, description="Checkpoint every N steps (and always at the end).")
    save_total_limit: int = Field(2, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0)
    early_stopping_patience: Optional[int] = Field(None, gt=0)
    keep_best: bool = Field(False, description="The adapter is the best evaluation's checkpoint, not the last step's.")
    max_bad_steps: int = Field(0, ge=0, description="NaN/Inf steps to skip before stopping the run.")
    tensorboard: bool = True
    # Several devices (`loraforge train --devices N`, torchrun or accelerate launch): README "More than one GPU".
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="auto/ddp: a full copy per device, LoRA gradients all-reduced; fsdp: the (4-bit) base "
        "sharded across devices (FSDP2). The global batch stays micro_batch_size x gradient_accumulation rows.")
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep the sharded parameters in CPU memory between uses.")


class EvalSettings(Section):
    """The base-vs-tuned evaluation `loraforge train` runs on the held-out rows when it ends."""

    metrics: list[str] = Field(default_factory=list, description="Task metrics (as `loraforge eval --metric`); "
                               "empty: loss only. Also `loraforge eval`'s default for this run.")
    max_new_tokens: int = Field(128, gt=0)
    rows: Optional[int] = Field(None, gt=0, description="Evaluate at most this many held-out rows.")
    batch_size: Optional[int] = Field(None, gt=0, description="Rows per batch for the loss and the greedy answers "
                                      "(left-padded); default train.micro_batch_size.")


class RunConfig(Section):
    description: str = ""
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    output_dir: Optional[str] = Field(None, description="Run directory; default runs/<name>-<timestamp>.")
    samples: int = Field(3, ge=0, description="Before/after answers shown at the end of training; with 0 (and no "
                         "eval.metrics) training ends without the base-vs-tuned evaluation.")

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = cross_check(self)
        if problems:
            raise ValueError(CROSS_CHECK_MARK + "\n".join(problems))
        return self

    def saved_dict(self) -> dict:
        """The resolved config as written to the run directory: secrets removed (at any depth)."""
        return without_secrets(self.model_dump(mode="json"))

    def remote_code_keys(self) -> list[str]:
        """The keys that say this run needs code shipped with its model or data."""
        keys = ["model.trust_remote_code"] if self.model.trust_remote_code else []
        return keys + [f"data.datasets[{i}].trust_remote_code" for i, src in enumerate(self.data.datasets or [])
                       if src.trust_remote_code]

    def allow_remote_code(self, allowed: bool, source: str) -> "RunConfig":
        """Apply this command line's --trust-remote-code (`allowed`): a config that asks for remote code without
        it is refused here, before anything loads; with it, loading may run that code. `source` names the config."""
        asking = self.remote_code_keys()
        if asking and not allowed:
            raise UserError(remote_code_refusal(source, asking))
        self.model._remote_code_allowed = allowed
        for src in self.data.datasets or []:
            src._remote_code_allowed = allowed
        return self


# --- loading -------------------------------------------------------------------------------

def format_errors(err: ValidationError, source: str, set_keys: dict[str, str] = {}) -> str:
    """The user's message for a config that does not validate (config_messages.py builds it)."""
    return config_messages.format_errors(err, source, RunConfig, set_keys)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        shown = repr(text) if redacted_override(text) == text else "(a value naming a secret, not shown)"
        raise UserError(f"--set {shown}: expected KEY=VALUE, for example --set train.max_steps=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


# Keys that exclude each other: a --set of one replaces the recipe's other (the user asked for it;
# the recipe's choice is only a default). Two --set flags that conflict are still an error.
EXCLUSIVE = (("data.eval_fraction", "data.eval_size", "data.eval_split"),)


# Keys that name parts of the recipe's own data: a --set of the data (e.g. `train --dataset`) drops them too.
FOLLOWS_DATA = {"data.datasets": ("data.eval_split",)}


def _drop_recipe_conflicts(raw: dict, key: str, value, set_keys: set[str]) -> None:
    for other in FOLLOWS_DATA.get(key, ()):
        section, _, name = other.rpartition(".")
        if other not in set_keys and isinstance(raw.get(section), dict):
            raw[section].pop(name, None)
    if value in (None, 0, ""):
        return
    for group in EXCLUSIVE:
        if key in group:
            for other in group:
                section, _, name = other.rpartition(".")
                node = raw.get(section)
                if other != key and other not in set_keys and isinstance(node, dict):
                    node.pop(name, None)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    set_keys = {".".join(parse_override(t)[0]) for t in overrides}
    for text in overrides:
        path, value = parse_override(text)
        _drop_recipe_conflicts(raw, ".".join(path), value, set_keys)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def resolve_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a shipped recipe."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"config file {p} not found. List shipped recipes with: loraforge recipes")
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = list_recipes()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown recipe '{name_or_path}'.{hint} Shipped recipes: {', '.join(names)}")


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (byte {e.start} is not UTF-8); a config is a YAML file, "
                        "see `loraforge config show` for one") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model, lora, data, train, ...)")
    return raw


def load_config(recipe: Optional[str] = None, overrides: list[str] = (), *, base_dir: Optional[Path] = None) -> RunConfig:
    """Load a recipe (path or shipped name; None = the embedded default), apply overrides, validate.

    Relative local dataset paths in a YAML file are resolved against the file's folder.
    """
    path = resolve_recipe(recipe) if recipe else RECIPES_DIR / "demo.yaml"
    raw = read_yaml(path)
    raw = apply_overrides(raw, list(overrides))
    set_keys = {".".join(parse_override(t)[0]): t for t in overrides if not t.startswith("output_dir=")}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_errors(e, str(path), set_keys)) from None
    shipped = str(path).startswith(str(RECIPES_DIR))
    cfg_dir = path.parent if not shipped else Path.cwd()
    for src in cfg.data.datasets or []:
        local = cfg_dir / src.path
        if shipped and not local.exists() and (PACKAGE_DIR / src.path).exists():
            local = PACKAGE_DIR / src.path  # data shipped with loraforge, e.g. assets/sql_demo.jsonl
        if not Path(src.path).is_absolute() and ("*" in src.path or local.exists()):
            src.path = str(local)
    return cfg


def recipe_name(recipe: Optional[str]) -> str:
    return Path(recipe).stem if recipe else "demo"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_description(name: str) -> str:
    return str(read_yaml(RECIPES_DIR / f"{name}.yaml").get("description", "")).strip()


def key_paths(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict (a saved config, a report) as {"section.key": value}: the paths errors and --set use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(key_paths(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_config(cfg: RunConfig, path: Path) -> None:
    """config.yaml, written whole (a kill mid-write leaves the old file or none, never half of one)."""
    from loraforge.atomic import write_text_whole

    write_text_whole(path, yaml.safe_dump(cfg.saved_dict(), sort_keys=False))
