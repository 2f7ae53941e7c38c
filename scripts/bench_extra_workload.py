
# --- appended by loraforge's scripts/gpu_bench.sh to its carried copy of ../shared/bench/workload.py ---
# A workload that is not in ../shared/bench, so that the speed is not tuned to w1/w2 alone: a
# Llama-3-shaped model (128,256-token vocabulary, grouped-query attention 24/8 heads, rope theta 5e5;
# the 3B size so that the call fits) and longer sequences (median 900 tokens, up to 4,096), 4 a step.
# The defaults above are unchanged; BENCH_MAX_LENGTH sets the truncation for every runner alike.
ARCH["l3"] = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
WORKLOADS["w3"] = (600, 900, 0.7, 64, 4096, 4)
MAX_LENGTH = int(os.environ.get("BENCH_MAX_LENGTH", MAX_LENGTH))
# Issue 24: where the GPU is busy. The Llama-3-8B shape (128,256 vocabulary, grouped-query attention 32/8 heads,
# 14,336-wide MLP; positions up to 128k) with long chat conversations (median 1,400 tokens, up to 4,096, 4 a
# step: c8) and one long sequence a step (s32k / s64k / s128k; BENCH_MAX_LENGTH must be at least the length).
ARCH["8b"] = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)
WORKLOADS["c8"] = (400, 1400, 0.6, 256, 4096, 4)
for _k in (32, 64, 128):
    WORKLOADS[f"s{_k}k"] = (12, _k * 1024, 0.0, _k * 1024, _k * 1024, 1)
