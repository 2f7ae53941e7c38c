"""`loraforge serve`: an OpenAI-compatible HTTP server and a web chat page for a run, a merged folder or a GGUF file.

models (what SOURCE is, loaded read-only) -> engine (one batched generate call for a group of requests, or
llama.cpp one request at a time) -> scheduler (a worker thread that groups waiting requests) -> api (FastAPI
routes, OpenAI's request and error shapes, SSE streaming) and chat.html (the page at `/`).
"""
