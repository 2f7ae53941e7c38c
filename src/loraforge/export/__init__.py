"""The export stage: merge a run's adapter into its base, write GGUF for llama.cpp, push to the Hub.

`merge.merge_to_folder(run_dir, out, dtype)`, `gguf.export_gguf(source, out, type)`,
`hub.push_folder(folder, repo)`; output paths are refused if they exist (unless forced) and are written
whole (`loraforge.atomic.written_whole`).
"""

# Choices the CLI offers; kept here so that building the CLI imports neither torch nor gguf.
MERGE_DTYPES = ("auto", "float32", "float16", "bfloat16")
GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "f32")
# Written by llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) from an f16 file.
GGUF_LLAMA_CPP_TYPES = ("q4_0", "q4_k_m", "q5_k_m")
