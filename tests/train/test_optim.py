"""The bitsandbytes optimizers as build_optimizer makes them: bitsandbytes' own updates without its per-tensor
device synchronizes, so every step must equal the stock optimizer's step bit for bit."""
import pytest
import torch

from loraforge.config import TrainSettings
from loraforge.train.optim import build_optimizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def adapter_like_params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4096), (4096, 8), (64, 2048), (2048, 64), (3, 5)]  # paged (>= 1e5 values) and not, tiny
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
def test_step_equals_bitsandbytes_stock_step(name, device):
    import bitsandbytes as bnb

    stock_cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                 "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    cfg = TrainSettings(optimizer=name, learning_rate=1e-2, weight_decay=0.01)
    ours_params, stock_params = adapter_like_params(device), adapter_like_params(device)
    ours = build_optimizer(ours_params, cfg, device)
    stock = stock_cls(stock_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    assert isinstance(ours, stock_cls) and type(ours).__name__ == stock_cls.__name__
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in ours_params]
        for params, opt in ((ours_params, ours), (stock_params, stock)):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
            opt.zero_grad()
    for a, b, start in zip(ours_params, stock_params, adapter_like_params(device)):
        assert not torch.equal(a, start) and torch.equal(a, b)  # moved, and exactly as the stock step moved it
    assert ours.state_dict()["state"].keys() == stock.state_dict()["state"].keys()


def test_lr_scheduler_drives_the_optimizer():
    from loraforge.train.optim import build_scheduler

    cfg = TrainSettings(optimizer="paged_adamw_32bit", learning_rate=1e-2, lr_scheduler="linear", warmup_ratio=0)
    params = adapter_like_params("cpu")[:1]
    opt = build_optimizer(params, cfg, "cpu")
    sched = build_scheduler(opt, cfg, total_steps=4)
    params[0].grad = torch.ones_like(params[0])
    with pytest.warns(UserWarning, match="Paged optimizers"):
        opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.75e-2)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_state_dict_round_trip_continues_as_the_uninterrupted_optimizer(name):
    """What a checkpoint saves (state_dict) and resume loads: the next steps equal an uninterrupted run's."""
    cfg = TrainSettings(optimizer=name, learning_rate=1e-2)
    straight, resumed = adapter_like_params("cpu"), adapter_like_params("cpu")
    opt = build_optimizer(straight, cfg, "cpu")
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=g) for p in straight] for _ in range(4)]

    def step(params, optimizer, i):
        for p, grad in zip(params, grads[i]):
            p.grad = grad.clone()
        optimizer.step()
        optimizer.zero_grad()

    for i in range(4):
        step(straight, opt, i)
    first = build_optimizer(resumed, cfg, "cpu")
    for i in range(2):
        step(resumed, first, i)
    saved = first.state_dict()
    again = build_optimizer(resumed, cfg, "cpu")
    again.load_state_dict(saved)
    for i in range(2, 4):
        step(resumed, again, i)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
