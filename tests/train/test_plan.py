import pytest

from loraforge.config import TrainSettings
from loraforge.train.optim import lr_factor, warmup_steps
from loraforge.train.plan import BatchPlan, collate, trained_tokens


def test_plan_is_deterministic_and_covers_each_row_once_per_epoch():
    plan = BatchPlan(lengths=[10] * 10, micro_batch_size=2, gradient_accumulation=2, seed=3)
    assert plan.steps_per_epoch == 3
    again = BatchPlan(lengths=[10] * 10, micro_batch_size=2, gradient_accumulation=2, seed=3)
    epoch0 = [i for s in range(3) for mb in plan.step_rows(s) for i in mb]
    assert sorted(epoch0) == list(range(10))
    assert [plan.step_rows(s) for s in range(6)] == [again.step_rows(s) for s in range(6)]
    assert plan.step_rows(0) != plan.step_rows(3)  # a new order each epoch


def test_group_by_length_sorts_within_windows():
    lengths = [5, 50, 7, 40, 9, 30, 11, 20]
    plan = BatchPlan(lengths, micro_batch_size=2, gradient_accumulation=1, seed=0, group_by_length=True)
    first = plan.step_rows(0)[0]
    assert sorted(lengths[i] for i in first) == [40, 50]


def test_total_steps_from_epochs_or_max_steps():
    plan = BatchPlan([1] * 100, micro_batch_size=4, gradient_accumulation=2, seed=0)
    assert plan.total_steps(epochs=2, max_steps=None) == 26
    assert plan.total_steps(epochs=2, max_steps=7) == 7


def test_collate_pads_right_and_masks_labels():
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert trained_tokens(rows) == 3


# After 1 warm-up step of 10, the last step is 8/9 of the way: linear 1/9, cosine (1 + cos(8pi/9)) / 2.
@pytest.mark.parametrize("kind,expected_end", [("constant", 1.0), ("linear", 1 / 9), ("cosine", 0.030154)])
def test_schedules_warm_up_then_follow_their_shape(kind, expected_end):
    cfg = TrainSettings(warmup_ratio=0.1, lr_scheduler=kind)
    total = 10
    warm = warmup_steps(cfg, total)
    assert warm == 1
    assert lr_factor(0, total, warm, kind) == pytest.approx(0.5)
    assert lr_factor(1, total, warm, kind) == pytest.approx(1.0)
    assert lr_factor(9, total, warm, kind) == pytest.approx(expected_end, abs=1e-3)


def test_split_by_tokens_keeps_order_and_cap():
    from loraforge.train.plan import split_by_tokens

    rows = [{"input_ids": [0] * n} for n in (300, 500, 100, 900, 50, 2000, 10)]
    parts = split_by_tokens(rows, 1024)
    assert [r for p in parts for r in p] == rows
    for p in parts:
        assert len(p) == 1 or sum(len(r["input_ids"]) for r in p) <= 1024
    assert split_by_tokens(rows[:2], 1024) == [rows[:2]]
