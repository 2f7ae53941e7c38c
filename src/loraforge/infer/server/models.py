"""What `loraforge serve SOURCE` serves: a run directory (the base quantized as in training plus the adapter, as
`chat` and `generate` load it), a merged folder (`loraforge merge`), or a GGUF file (through llama-cpp-python).

Every source is read only, and nothing named inside it runs: no remote code, whatever its config says."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loraforge.errors import UserError, first_line
from loraforge.data.tokenize import encode_prompt
from loraforge.infer.generate import context_length, reply_stop_strings, stop_token_ids, text_stops

GGUF_TEMPLATE_KEY = "loraforge.template"  # the training template's record, written by `export gguf`
GGUF_MAX_CONTEXT = 8192  # llama.cpp allocates its KV cache for the whole context up front


@dataclass
class ServedModel:
    name: str  # the model id clients send (`/v1/models`)
    kind: str  # run, merged folder or GGUF
    tokenizer: object
    template: object  # loraforge.data.templates.ChatTemplate: the training format
    engine: object  # loraforge.infer.server.engine.TransformersEngine or LlamaCppEngine
    context: Optional[int]  # tokens of prompt + reply the model takes
    notes: list[str] = field(default_factory=list)  # said once at start-up

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """Markers matched in the decoded reply: only those that are plain text (`[INST]`, `### HUMAN:`); a control
        token ends the reply by its id, and written as text it is part of the answer (as for `loraforge generate`)."""
        return text_stops(self.tokenizer, reply_stop_strings(self.template))

    @property
    def chat_stop_ids(self) -> frozenset:
        """Where a chat reply ends without decoding: the same tokens as for `loraforge generate`."""
        return frozenset(stop_token_ids(self.tokenizer, reply_stop_strings(self.template)))

    @property
    def eos_ids(self) -> frozenset:
        return frozenset([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The training template's prompt for the next assistant turn, as token ids: exactly as training tokenized
        it (message text as text, never as the template's markers)."""
        return encode_prompt(self.template, messages)

    def completion_prompt_ids(self, text: str) -> list[int]:
        """Raw text to continue, no template: BOS first where the tokenizer adds one and the text lacks it."""
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


def source_kind(source) -> tuple[str, Path]:
    """("run" | "merged" | "gguf", path) for what SOURCE is, checked without loading anything."""
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run directory, a merged folder or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; give a run directory, a merged folder or a .gguf file")
        return "gguf", path
    from loraforge.rundir import CONFIG_FILE

    if (path / CONFIG_FILE).is_file():
        return "run", path
    if (path / "config.json").is_file():
        return "merged", path
    raise UserError(f"{path} is neither a run directory (no config.yaml) nor a merged model folder (no config.json)")


def load_served_model(source, system: Optional[str] = None) -> ServedModel:
    """The model at `source` ready to generate; `system` replaces the training system prompt."""
    kind, path = source_kind(source)
    return {"gguf": load_gguf, "run": load_run, "merged": load_merged}[kind](path, system)


def load_run(run_dir: Path, system: Optional[str]) -> ServedModel:
    """As `loraforge chat/generate RUN_DIR` load it: the base quantized as in training plus the adapter."""
    from loraforge.infer.server.engine import TransformersEngine
    from loraforge.infer.session import load_session
    from loraforge.rundir import read_run

    info = read_run(run_dir, finished=True)
    if info.cfg.model.trust_remote_code:
        raise UserError(f"{run_dir}/config.yaml sets model.trust_remote_code: true, and serve never runs code named "
                        "in a run folder; Llama-family models need none: set it to false in that file to serve it")
    session = load_session(run_dir, system=system)
    notes = [f"adapter on the base {session.base} ({session.quantization}, {session.device})"]
    return ServedModel(name=run_dir.resolve().name, kind="run", tokenizer=session.tokenizer, template=session.template,
                       engine=TransformersEngine(session.model, session.tokenizer),
                       context=context_length(session.model), notes=notes)


def folder_template(tokenizer, record: Optional[dict], system: Optional[str], where: str):
    """The training template from its record (template.json), else the tokenizer's own chat template."""
    from loraforge.data.templates import get_template, template_from_record

    if record is not None:
        template = template_from_record(record, tokenizer)
        return get_template(template.name, tokenizer, system_prompt=system) if system is not None else template, None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where} has no template.json and no chat template, so the chat format is unknown; "
                        "serve a run directory or a folder written by `loraforge merge`")
    return (get_template("tokenizer", tokenizer, system_prompt=system),
            f"{where} has no loraforge template record: chats use its own chat template")


def load_merged(folder: Path, system: Optional[str]) -> ServedModel:
    """A merged checkpoint folder: weights with safetensors, never remote code; the template from template.json."""
    from transformers import AutoModelForCausalLM

    from loraforge.config import ModelSettings
    from loraforge.infer.server.engine import TransformersEngine
    from loraforge.model.load import load_tokenizer, resolve_dtype, select_device, use_exact_cpu_kernels
    from loraforge.rundir import TEMPLATE_FILE, read_json

    device = select_device()
    tokenizer = load_tokenizer(ModelSettings(base=str(folder), trust_remote_code=False), str(folder))
    record = read_json(folder / TEMPLATE_FILE) if (folder / TEMPLATE_FILE).is_file() else None
    if record is not None and not isinstance(record, dict):
        raise UserError(f"{folder / TEMPLATE_FILE}: expected a JSON object; restore the file `loraforge merge` wrote")
    template, note = folder_template(tokenizer, record, system, str(folder))
    dtype = resolve_dtype("auto", device)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device},
                                                     use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the model in {folder}: {first_line(e)}") from e
    if device == "cpu":
        use_exact_cpu_kernels(model)
    model.eval()
    notes = [f"merged model {folder} ({str(dtype).removeprefix('torch.')}, {device})"] + ([note] if note else [])
    return ServedModel(name=folder.resolve().name, kind="merged folder", tokenizer=tokenizer, template=template,
                       engine=TransformersEngine(model, tokenizer), context=context_length(model), notes=notes)


def gguf_metadata(path: Path) -> tuple[Optional[dict], Optional[int]]:
    """The training template's record that `export gguf` writes (None in other files), and the trained context."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    context = fields[f"{arch}.context_length"].contents() if f"{arch}.context_length" in fields else None
    record = None
    if GGUF_TEMPLATE_KEY in fields:
        try:
            record = json.loads(fields[GGUF_TEMPLATE_KEY].contents())
        except (TypeError, ValueError):
            record = None
    if not (isinstance(record, dict) and isinstance(record.get("name"), str)):
        record = None
    return record, int(context) if context else None


def load_gguf(path: Path, system: Optional[str]) -> ServedModel:
    """A GGUF file: llama.cpp computes, the tokenizer (transformers' GGUF reader) renders and decodes."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("serving a GGUF file needs llama-cpp-python, which is not installed: "
                        "pip install llama-cpp-python (it compiles llama.cpp; `pip install \"loraforge[llama-cpp]\"` "
                        "does the same), or serve the run directory or merged folder it was exported from") from None
    from transformers import AutoTokenizer

    from loraforge.infer.server.engine import LlamaCppEngine

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        record, trained_context = gguf_metadata(path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"could not read {path} as a GGUF model: {first_line(e)}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    template, note = folder_template(tokenizer, record, system, str(path))
    context = min(trained_context or GGUF_MAX_CONTEXT, GGUF_MAX_CONTEXT)
    try:
        llm = Llama(model_path=str(path), n_ctx=context, n_threads=os.cpu_count() or 1, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp could not load {path}: {first_line(e)}") from e
    notes = [f"GGUF {path} through llama.cpp (llama-cpp-python), context {llm.n_ctx()} tokens; "
             "requests are answered one at a time (llama-cpp-python decodes one sequence)"]
    return ServedModel(name=path.stem, kind="GGUF", tokenizer=tokenizer, template=template,
                       engine=LlamaCppEngine(llm, tokenizer), context=llm.n_ctx(),
                       notes=notes + ([note] if note else []))
