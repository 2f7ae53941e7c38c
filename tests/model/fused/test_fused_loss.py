"""The chunked linear + cross-entropy (model/fused/loss.py) against the full-logits loss."""
import torch

from loraforge.model.fused import loss


def _case(dtype, n=30, vocab=50, hidden=16):
    torch.manual_seed(1)
    h = torch.randn(n, hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=dtype)
    t = torch.randint(0, vocab, (n,))
    t[[0, 5, n - 1]] = -100
    return h, w, t


def test_linear_cross_entropy_matches_full_logits(monkeypatch):
    monkeypatch.setattr(loss, "CE_CHUNK_ELEMENTS", 7 * 50)  # chunks of 7 tokens, a ragged last one
    h, w, t = _case(torch.float32)
    got = loss.LinearCrossEntropy.apply(h, w, t, 1 / 23)
    (gh,) = torch.autograd.grad(got, h)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum", ignore_index=-100) / 23
    (rh,) = torch.autograd.grad(ref, h)
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, rtol=1e-5, atol=1e-7)


def test_fp16_gradient_survives_a_large_step_until_the_loss_scale_arrives():
    """fp16 (T4 recipes): probabilities / 40k tokens would underflow fp16 if scaled before the
    GradScaler's factor; the loss keeps the per-token gradient and scales in fp32 in backward."""
    h, w, t = _case(torch.float16, vocab=4000)
    n_items, loss_scale = 40_000, 65536.0
    got = loss.LinearCrossEntropy.apply(h, w, t, 1 / n_items) * loss_scale
    (gh,) = torch.autograd.grad(got, h)
    h32 = h.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h32 @ w.float().t(), t, reduction="sum", ignore_index=-100) / n_items
    (rh,) = torch.autograd.grad(ref * loss_scale, h32)
    assert torch.isfinite(gh).all()
    assert float((gh.float() - rh).norm() / rh.norm()) < 1e-2
