"""`loraforge chat RUN_DIR` and `loraforge generate RUN_DIR`: use a fine-tuned run in its training template."""
from __future__ import annotations

import contextlib
import json
import sys

from rich.console import Console


def _model_options(p) -> None:
    from loraforge.cli import trust_option

    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory written by `loraforge train`")
    p.add_argument("--base", action="store_true", help="use the base model without the adapter, for comparison")
    p.add_argument("--system", help="system prompt (default: the run's data.system_prompt, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="longest reply in tokens [256]")
    # None = not given: --greedy with an explicit --temperature/--top-p is a contradiction, not a default
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy [0.7]")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to "
                   "this probability mass [0.9]")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling, for repeatable answers [0]")
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token (same as --temperature 0)")
    trust_option(p)


def register(sub) -> None:
    chat = sub.add_parser(
        "chat", help="chat with a fine-tuned run in the terminal",
        description="An interactive chat with the run's model (the base quantized as in training, plus the adapter) "
        "in the training chat template, with history. Replies stream as they are generated. Type /reset to clear "
        "the history and /exit (or Ctrl-D) to quit. Reads lines from stdin, so it can be piped, too.")
    _model_options(chat)
    chat.set_defaults(handler=run_chat)

    gen = sub.add_parser(
        "generate", help="answer one prompt, or a JSONL file of prompts, with a fine-tuned run",
        description="Generate replies in the run's training template. --prompt answers one question on stdout; "
        '--input prompts.jsonl (rows {"prompt": ...} or {"messages": [...]}) writes --output answers.jsonl (or '
        'stdout) with {"prompt", "answer"} added to each row. Replies end at EOS and never contain the template\'s '
        'markers.')
    _model_options(gen)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the user message to answer")
    what.add_argument("--input", metavar="PROMPTS.jsonl", help="a JSONL file of prompts")
    gen.add_argument("--output", metavar="ANSWERS.jsonl", help="where to write the answers (with --input; "
                     "default: JSONL on stdout)")
    gen.add_argument("--force", action="store_true", help="replace an existing --output file")
    gen.set_defaults(handler=run_generate)


def _sampling(args):
    from loraforge.errors import UserError
    from loraforge.infer.generate import Sampling

    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be at least 1")
    if args.greedy and ((args.temperature or 0) > 0 or args.top_p is not None):
        flag = "--temperature" if (args.temperature or 0) > 0 else "--top-p"
        raise UserError(f"--greedy always picks the most likely token, so {flag} would be ignored; "
                        f"give --greedy or {flag}, not both")
    temperature = 0.7 if args.temperature is None else args.temperature
    top_p = 0.9 if args.top_p is None else args.top_p
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=args.seed, greedy=args.greedy)


def _load(args, console: Console):
    from loraforge.infer.session import load_session
    from loraforge.model.quiet import quiet_progress_bars

    with quiet_progress_bars(), console.status("loading the model"):
        session = load_session(args.run_dir, base_only=args.base, system=args.system,
                               trust_remote_code=args.trust_remote_code)
    what = "base model only (no adapter)" if args.base else "adapter on the base"
    console.print(f"{what}: {session.base} ({session.quantization}, {session.device}); "
                  f"template {session.template.name}", highlight=False, markup=False)  # names from the run: literal
    return session


def run_chat(args) -> int:
    from loraforge.infer.chat import COMMANDS, Chat, run_chat as chat_loop

    sampling = _sampling(args)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    session = _load(args, console)
    console.print(f"chatting with {args.run_dir} - {COMMANDS}", highlight=False, markup=False)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return chat_loop(Chat(session, sampling), sys.stdin, write, echo_input=not sys.stdin.isatty())


def run_generate(args) -> int:
    from loraforge.errors import UserError

    sampling = _sampling(args)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.prompt is not None:
        if args.output:
            raise UserError("--output goes with --input; with --prompt the answer is printed")
        if not args.prompt.strip():
            raise UserError("--prompt is empty; give the message to answer")
        return _generate_one(args, sampling, console)
    return _generate_file(args, sampling, console)


def _generate_one(args, sampling, console) -> int:
    from loraforge.data.tokenize import encode_prompt
    from loraforge.infer.generate import check_fits, generate_reply, reply_stop_strings

    session = _load(args, console)
    prompt = encode_prompt(session.template, [{"role": "user", "content": args.prompt}])
    check_fits(session.model, session.tokenizer, prompt, sampling.max_new_tokens, "--prompt")
    reply = generate_reply(session.model, session.tokenizer, prompt, stop_strings=reply_stop_strings(session.template),
                           on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), **sampling.as_kwargs())
    if not reply:
        console.print("(no reply: the model ended its turn at once)")
    sys.stdout.write("\n")
    return 0


def _generate_file(args, sampling, console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from loraforge.atomic import written_whole
    from loraforge.export.paths import check_output, check_replaceable_output
    from loraforge.infer.batch import answer_rows, read_prompts

    rows = read_prompts(args.input)
    if args.output:
        check_output(args.output, args.force, "--output", command="loraforge generate")
    session = _load(args, console)
    columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    recheck = lambda: check_replaceable_output(args.output, "--output")  # noqa: E731
    with (written_whole(args.output, before_replace=recheck) if args.output else contextlib.nullcontext()) as tmp, \
            (tmp.open("w", encoding="utf-8") if tmp else contextlib.nullcontext(sys.stdout)) as out, \
            Progress(*columns, console=console) as progress:  # progress on stderr: stdout stays pure JSONL
        task = progress.add_task("generate", total=len(rows))
        for answered in answer_rows(session, rows, sampling):
            out.write(json.dumps(answered, ensure_ascii=False) + "\n")
            out.flush()
            progress.advance(task)
    console.print(f"{len(rows)} answers written to {args.output or 'stdout'}", highlight=False, markup=False)
    return 0
