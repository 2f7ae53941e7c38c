"""`loraforge merge` and `loraforge export gguf|adapter`: a run's result as files other tools load."""
from __future__ import annotations

from rich.console import Console
from rich.text import Text

from loraforge.export import GGUF_TYPES, MERGE_DTYPES


def _hub_options(p, what: str) -> None:
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help=f"also upload the {what} to this Hub repository "
                   "(created if needed; the token comes from HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")


def register(sub) -> None:
    from loraforge.cli import trust_option

    merge = sub.add_parser(
        "merge", help="fold a run's adapter into the base weights: a plain transformers checkpoint",
        description="Merge the LoRA adapter into the base model and save a checkpoint folder (safetensors, "
        "tokenizer with the training chat template, template.json) that AutoModelForCausalLM loads without PEFT. "
        "A 4-bit or 8-bit run is merged into the base reloaded in 16/32-bit, not into the quantized weights.")
    merge.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory written by `loraforge train`")
    merge.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    merge.add_argument("--dtype", choices=MERGE_DTYPES, default="auto",
                       help="weights' dtype [auto: the base checkpoint's own, float32 for the built-in tiny model]")
    merge.add_argument("--force", action="store_true", help="replace an existing --out folder that `loraforge "
                       "merge` made (other folders are never replaced)")
    trust_option(merge)
    _hub_options(merge, "merged model")
    merge.set_defaults(handler=run_merge)

    export = sub.add_parser("export", help="write a run as GGUF (llama.cpp) or copy/push its adapter")
    kinds = export.add_subparsers(dest="export_kind", metavar="KIND", required=True)
    gguf = kinds.add_parser(
        "gguf", help="a GGUF file that llama.cpp (and transformers' gguf_file=) loads",
        description="Write a Llama checkpoint as GGUF with llama.cpp's `gguf` writer: architecture metadata, the "
        "vocabulary (SentencePiece, or byte-level BPE as in Llama 3 and SmolLM2, with merges and llama.cpp's "
        "pre-tokenizer name), token types, special tokens and the training chat template. The 4/5-bit types come "
        "from llama.cpp's own quantizer and need llama-cpp-python. SOURCE is a run directory (its adapter is merged "
        "in memory, in float32) or a folder from `loraforge merge`.")
    gguf.add_argument("source", metavar="RUN_DIR|MERGED_DIR")
    gguf.add_argument("--out", required=True, metavar="FILE.gguf")
    gguf.add_argument("--type", choices=GGUF_TYPES, default="f16",
                      help="weights: f16 (half size, near-exact), q8_0 (8-bit), q5_k_m / q4_k_m / q4_0 (5/4-bit, "
                      "what llama.cpp and Ollama users usually run; need llama-cpp-python), f32 (exact) [f16]")
    gguf.add_argument("--force", action="store_true", help="replace an existing --out GGUF file")
    trust_option(gguf)
    gguf.set_defaults(handler=run_gguf)

    adapter = kinds.add_parser(
        "adapter", help="copy a run's adapter (PEFT format + tokenizer + template) and/or push it to the Hub",
        description="The run's adapter/ folder loads with plain PeftModel.from_pretrained on its base model. "
        "Copy it with --out, upload it with --push-to-hub, or both.")
    adapter.add_argument("run_dir", metavar="RUN_DIR")
    adapter.add_argument("--out", metavar="DIR", help="copy the adapter folder here")
    adapter.add_argument("--force", action="store_true", help="replace an existing --out folder that `loraforge "
                         "export adapter` made (other folders are never replaced)")
    _hub_options(adapter, "adapter")
    adapter.set_defaults(handler=run_adapter)


def run_merge(args) -> int:
    if args.push_to_hub:  # before the merge: a missing token should not cost minutes of work
        from loraforge.export.hub import check_push

        check_push(args.push_to_hub)
    from loraforge.export.merge import merge_to_folder
    from loraforge.model.quiet import quiet_progress_bars

    console = Console(highlight=False, soft_wrap=True)
    with quiet_progress_bars(), console.status("merging the adapter into the base weights"):
        out, merged, dtype = merge_to_folder(args.run_dir, args.out, args.dtype, args.force, args.trust_remote_code)
    if merged.note:
        console.print(f"note: {merged.note}", markup=False)
    console.print(f"merged model ({str(dtype).removeprefix('torch.')}): {out}\n"
                  f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); GGUF: "
                  f"loraforge export gguf {out} --out {out}.gguf", markup=False)  # paths: literal
    if args.push_to_hub:
        _push(console, out, args.push_to_hub, args.private, "merged model")
    return 0


def run_gguf(args) -> int:
    from loraforge.export.gguf import export_gguf
    from loraforge.model.quiet import quiet_progress_bars

    console = Console(highlight=False, soft_wrap=True)
    with quiet_progress_bars(), console.status(f"writing {args.type} GGUF"):
        result = export_gguf(args.source, args.out, args.type, args.force, args.trust_remote_code)
    if result.note:
        console.print(f"note: {result.note}", markup=False)
    size = result.path.stat().st_size / 2**20
    template = "the training chat template" if result.chat_template else "no chat template"
    console.print(f"GGUF ({args.type}, {result.tensors} tensors, {result.vocab_size} tokens, {template}, "
                  f"{size:.1f} MiB): {result.path}\nrun it with llama.cpp: llama-cli -m {result.path} -cnv", markup=False)
    if result.modelfile_note:
        console.print(f"note: {result.modelfile_note}", markup=False)
    console.print(f"Ollama Modelfile: {result.modelfile}\n  ollama create {result.path.stem} -f {result.modelfile}\n"
                  f"serve it: loraforge serve {result.path}", markup=False)
    return 0


def run_adapter(args) -> int:
    import shutil

    from loraforge.errors import UserError
    from loraforge.atomic import written_whole
    from loraforge.export.paths import check_output, check_replaceable_output
    from loraforge.ownership import ADAPTER, write_marker
    from loraforge.rundir import read_run

    if not args.out and not args.push_to_hub:
        raise UserError("export adapter: give --out DIR to copy the adapter, --push-to-hub OWNER/NAME to upload it, "
                        "or both")
    if args.push_to_hub:
        from loraforge.export.hub import check_push

        check_push(args.push_to_hub)
    console = Console(highlight=False, soft_wrap=True)
    info = read_run(args.run_dir, finished=True)
    folder = info.adapter_dir
    if args.out:
        out = check_output(args.out, args.force, kind=ADAPTER, command="loraforge export adapter")
        with written_whole(out, folder=True,
                           before_replace=lambda: check_replaceable_output(out, "--out", ADAPTER)) as tmp:
            shutil.copytree(info.adapter_dir, tmp, dirs_exist_ok=True)
            write_marker(tmp, ADAPTER)  # what a later --force may replace
        console.print(f"adapter (PEFT format, tokenizer, template.json): {out}", markup=False)
        folder = out
    if args.push_to_hub:
        _push(console, folder, args.push_to_hub, args.private, "adapter")
    return 0


def _push(console, folder, repo: str, private: bool, what: str) -> None:
    from loraforge.export.hub import push_folder

    with console.status(Text(f"uploading the {what} to {repo}")):
        url = push_folder(folder, repo, private=private, what=what)
    console.print(f"pushed the {what} to {url}", markup=False)
