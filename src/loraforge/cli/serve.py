"""`loraforge serve SOURCE`: an OpenAI-compatible API and a web chat page for a run, a merged folder or a GGUF file."""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

from rich.console import Console

API_KEY_VARIABLE = "LORAFORGE_API_KEY"


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible API and a web chat for a run, a merged folder or a GGUF file",
        description="Serve the model at SOURCE over HTTP: OpenAI's /v1/chat/completions (streamed or not), "
        "/v1/completions and /v1/models, in the training chat template with its stop tokens, and a web chat page at "
        "/. Requests that arrive together are answered in one batch. SOURCE is a run directory (the base quantized "
        "as in training plus the adapter), a folder from `loraforge merge`, or a .gguf file (needs "
        "llama-cpp-python). Listens on 127.0.0.1 (this machine only) unless --host says otherwise.")
    p.add_argument("source", metavar="RUN_DIR|MERGED_DIR|FILE.gguf")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on [127.0.0.1: this machine only]; "
                   "0.0.0.0 lets every machine that reaches this one use the model (set an API key then)")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on [8000]")
    p.add_argument("--api-key", metavar="KEY", help="require the header Authorization: Bearer KEY on /v1 "
                   f"(or set {API_KEY_VARIABLE}, which keeps the key out of the process list); never printed")
    p.add_argument("--system", help="system prompt for chats that send none (default: the run's data.system_prompt)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="requests answered together in one generate call [8]; 1 answers one at a time")
    p.set_defaults(handler=run_serve)


def _check_installed() -> None:
    from loraforge.errors import UserError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"loraforge serve needs FastAPI and uvicorn ({e.name} is not installed): "
                        "pip install \"loraforge[serve]\"") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once."""
    from loraforge.errors import UserError

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: choose a port from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = "choose another with --port" if e.errno == 98 else "check --host and --port"
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    from loraforge.errors import UserError

    _check_installed()
    if args.max_batch_size < 1:
        raise UserError("--max-batch-size must be at least 1")
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    if api_key is not None and not api_key.strip():
        raise UserError(f"the API key is empty; give --api-key KEY or set {API_KEY_VARIABLE}")
    from loraforge.infer.server.models import source_kind

    source_kind(args.source)  # a wrong path fails before the port is taken
    sock = bind(args.host, args.port)
    try:
        return _serve(args, sock, api_key)
    finally:
        sock.close()


def _serve(args, sock: socket.socket, api_key) -> int:
    import uvicorn

    from loraforge.infer.server.api import create_app
    from loraforge.infer.server.models import load_served_model
    from loraforge.infer.server.scheduler import Scheduler
    from loraforge.model.quiet import quiet_progress_bars

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    with quiet_progress_bars(), console.status("loading the model"):
        served = load_served_model(args.source, system=args.system)
    for note in served.notes:
        console.print(note)
    console.print(f"template {served.template.name}; context {served.context} tokens")
    scheduler = Scheduler(served.engine, max_batch_size=args.max_batch_size)
    loopback = is_loopback(args.host)
    port = sock.getsockname()[1]
    names = {"localhost", "127.0.0.1", "::1", args.host.lower()}
    app = create_app(served, scheduler, api_key, allowed_hosts=names if loopback else None)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    batching = (f"up to {scheduler.max_batch_size} requests per batch" if scheduler.max_batch_size > 1
                else "one request at a time")
    console.print(f"serving '{served.name}' ({batching})\n  web chat:   http://{shown}:{port}/\n"
                  f"  OpenAI API: http://{shown}:{port}/v1  (model \"{served.name}\")")
    if api_key:
        console.print("  API key required (Authorization: Bearer ...)")
    if not loopback:
        console.print(f"warning: listening on {args.host}: other machines can reach this server"
                      + ("" if api_key else f"; without --api-key (or {API_KEY_VARIABLE}) anyone who reaches it can "
                         "use the model"))
    console.print("Ctrl-C stops it")
    sys.stderr.flush()
    scheduler.start()
    try:
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        scheduler.stop()
    return 0
