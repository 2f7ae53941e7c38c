
# --- appended by loraforge's scripts/gpu_bench.sh to its carried copy of ../shared/bench/workload.py ---
# A workload that is not in ../shared/bench, so that the speed is not tuned to w1/w2 alone: a
# Llama-3-shaped model (128,256-token vocabulary, grouped-query attention 24/8 heads, rope theta 5e5;
# the 3B size so that the call fits) and longer sequences (median 900 tokens, up to 4,096), 4 a step.
# The defaults above are unchanged; BENCH_MAX_LENGTH sets the truncation for every runner alike.
ARCH["l3"] = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
WORKLOADS["w3"] = (600, 900, 0.7, 64, 4096, 4)
MAX_LENGTH = int(os.environ.get("BENCH_MAX_LENGTH", MAX_LENGTH))
