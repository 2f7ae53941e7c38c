"""The host-side logic of the attention kernels and of what checkpoints keep, on the CPU: the cuDNN kernel's
split of a stream into long sequences and varlen runs, its padding (exact for causal attention, shown with the
explicit-softmax kernel against float64 SDPA), the keep policy and the host-memory limit of pinned buffers.
The CUDA kernels themselves are checked on the GPU host (test_fused_cuda.py)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loraforge.model.fused import keep, offload
from loraforge.model.fused.attention_kernels import CudnnKernel, MathKernel, padded_length, segments


def _sdpa_reference(q, k, v, bounds, scale):
    groups = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[s:e].transpose(0, 1).double() for t in (q, k, v))
        ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_math_kernel_forward_and_backward_from_kept_statistics_match_sdpa(kv_heads):
    """MathKernel's backward uses only (q, k, v, out, log-sum-exp) - what a checkpoint keeps - as flash does."""
    torch.manual_seed(0)
    bounds = [0, 7, 30, 31, 50]
    q = torch.randn(50, 4, 16, requires_grad=True)
    k, v = (torch.randn(50, kv_heads, 16, requires_grad=True) for _ in range(2))
    dout = torch.randn(50, 4, 16)
    seg = segments(bounds, "cpu")
    kernel = MathKernel()
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), seg, 0.25)
    got = kernel.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, seg, 0.25)
    ref = _sdpa_reference(q, k, v, bounds, 0.25)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert torch.allclose(out.double(), ref, atol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w.double(), atol=1e-5)


def test_padding_a_sequence_at_its_end_changes_nothing_for_causal_attention():
    """What CudnnKernel relies on: zero rows appended to q, k, v (and to dout, out in backward) leave the real
    rows' output and all real gradients exactly as without them."""
    torch.manual_seed(1)
    n, rows = 37, padded_length(37)
    assert rows == 128
    q, k, v, dout = (torch.randn(n, 2, 8, dtype=torch.float64) for _ in range(4))
    kernel = MathKernel()
    out, lse = kernel.forward(q, k, v, segments([0, n], "cpu"), 0.3)
    grads = kernel.backward(dout, q, k, v, out, lse, segments([0, n], "cpu"), 0.3)
    pad = lambda t: F.pad(t, (0, 0, 0, 0, 0, rows - n))  # noqa: E731
    pseg = segments([0, rows], "cpu")
    pout, plse = kernel.forward(pad(q), pad(k), pad(v), pseg, 0.3)
    pgrads = kernel.backward(pad(dout), pad(q), pad(k), pad(v), pout, plse, pseg, 0.3)
    assert torch.allclose(pout[:n], out, atol=1e-12)
    for g, pg in zip(grads, pgrads):
        assert torch.allclose(pg[:n], g, atol=1e-12)


def test_padded_lengths_are_few_per_octave_and_at_most_an_eighth_longer():
    for n in (1, 100, 128, 129, 4095, 4096, 4097, 8193, 32768, 32769, 131072, 200000):
        p = padded_length(n)
        assert p >= n and p % 128 == 0 and (p - n <= 127 or p <= n * 1.125)
    assert padded_length(32768) == 32768 and padded_length(131072) == 131072
    assert len({padded_length(n) for n in range(4097, 8193)}) == 8


def test_cudnn_kernel_splits_the_stream_into_long_sequences_and_varlen_runs():
    lengths = [100, 5000, 30, 40, 6000]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    pieces = CudnnKernel(min_len=4096).pieces(segments(bounds, "cpu"))
    assert [(s, e) for s, e, _ in pieces] == [(0, 100), (100, 5100), (5100, 5170), (5170, 11170)]
    assert pieces[1][2] is None and pieces[3][2] is None  # each long one alone through cuDNN
    assert pieces[0][2].bounds == [0, 100] and pieces[2][2].bounds == [0, 30, 70] and pieces[2][2].max_len == 40
    one = CudnnKernel(min_len=4096).pieces(segments([0, 32768], "cpu"))
    assert [(s, e, sub) for s, e, sub in one] == [(0, 32768, None)]
    stream = segments([0, 300, 1700], "cpu")
    short = CudnnKernel(min_len=4096).pieces(stream)
    assert short == [(0, 1700, stream)]  # all short: one varlen call over the stream as it is


LLAMA3_8B = SimpleNamespace(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128)
H200 = (790e12, 55e9)  # bf16 matmul FLOP/s and device -> pinned copy bytes/s measured there (docs/perf-notes.md)


def test_offloaded_checkpoints_keep_what_the_copy_engine_moves_while_a_layer_computes():
    """auto: attention first (most FLOPs saved per byte), then q/k/v, then up, as far as the copies fit in the
    forward's time; the first layers keep, so the same pinned buffers serve every step."""
    long32k = keep.plan("auto", True, [32768], LLAMA3_8B, 2, H200).layers
    assert long32k["attention"] == 32 and long32k["qkv"] == 32 and 0 < long32k["up"] < 32
    long64k = keep.plan("auto", True, [65536], LLAMA3_8B, 2, H200).layers
    assert long64k == {"attention": 32, "qkv": 32, "up": 32}  # attention's quadratic time hides every copy
    chats = keep.plan("auto", True, [1400, 2100, 900, 1700], LLAMA3_8B, 2, H200).layers
    assert chats["attention"] == chats["qkv"] == 32 and chats["up"] < 8  # short sequences: little time to hide copies in
    assert keep.plan("auto", True, [1000, 900, 1100], LLAMA3_8B, 2, H200).layers == {}  # host-bound steps: nothing
    slow_copies = keep.plan("auto", True, [32768], LLAMA3_8B, 2, (790e12, 10e9)).layers  # an older PCIe link
    assert slow_copies["attention"] < 32 and slow_copies["up"] == 0
    assert keep.plan("auto", True, [32768], LLAMA3_8B, 2, H200, attention=False).layers.get("attention", 0) == 0


def test_device_checkpoints_keep_only_long_sequences_attention_and_on_off_are_all_or_nothing():
    for lengths, kept in (([1400, 2000, 900, 4096], False), ([32768], True), ([8000, 100], True)):
        assert keep.plan("auto", False, lengths, LLAMA3_8B, 2).layers == ({"attention": 32} if kept else {})
    assert keep.plan("on", False, [10, 20], LLAMA3_8B, 2).layers == {"attention": 32, "qkv": 32, "up": 32}
    assert keep.plan("off", True, [65536], LLAMA3_8B, 2, H200).layers == {}


def test_a_memo_keeps_what_its_plan_and_the_room_allow_and_gives_it_back_in_the_recompute(monkeypatch):
    store = offload.CheckpointStore(torch.device("cpu"), offload=False)
    index = store.save([torch.zeros(4)])
    plan = keep.KeepPlan({"attention": 1, "qkv": 2})
    memo = keep.Memo(plan, 0, store, index)
    memo.keep("attention", [torch.ones(3), torch.zeros(2)])
    memo.keep("up", [torch.ones(5)])  # not in the plan
    memo.keep("qkv", [torch.full((2,), 7.0)])
    assert memo.take("qkv") is None  # only the recompute takes
    h, *kept = store.load(index)  # as LayerCheckpoint's backward does: the kept tensors follow the input
    assert torch.equal(h, torch.zeros(4)) and len(kept) == 3
    memo.recomputing, memo.tensors = True, kept
    assert torch.equal(memo.take("qkv")[0], torch.full((2,), 7.0)) and len(memo.take("attention")) == 2
    assert memo.take("up") is None
    index = store.save([torch.zeros(4)])
    later = keep.Memo(plan, 1, store, index)  # layer 1: the plan keeps qkv only
    later.keep("attention", [torch.ones(3)])
    assert later.kinds == []
    monkeypatch.setattr(store, "room_for", lambda i, tensors: False)
    full = keep.Memo(plan, 0, store, index)
    full.keep("attention", [torch.ones(3)])
    assert full.kinds == []  # no room anywhere: the recompute computes it again


def test_pinned_memory_stays_within_the_host_limit(monkeypatch):
    """Every buffer ever pinned counts (torch's pinned-memory cache keeps outgrown ones); past the limit a
    checkpoint tensor gets no buffer (it stays on the device)."""
    monkeypatch.setattr(offload, "_EVER_PINNED", [1000])
    assert offload.pinned_bytes() == 1000
    assert offload.host_has_room(500, limit=2000) and not offload.host_has_room(1001, limit=2000)
    monkeypatch.setattr(offload, "_host_limit", lambda: 1000)
    assert offload._pinned_slot(("test", 0), torch.zeros(8, 4)) is None
