"""The evaluation's two losses from one pass equal the model's own loss computed twice."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from loraforge.train.loss import mean_token_loss, response_and_all_token_loss


def test_one_pass_gives_the_response_and_all_token_losses_of_two(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((9, 4), (17, 11), (5, 2), (12, 12)):  # the last trains nothing
        ids = torch.randint(3, 500, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    got = response_and_all_token_loss(model, rows, batch_size=3, pad_id=0, device="cpu")
    every_token = [{"input_ids": r["input_ids"], "labels": list(r["input_ids"])} for r in rows]
    for name, variant in (("responses", rows), ("all", every_token)):
        loss, count = mean_token_loss(model, variant, batch_size=3, pad_id=0, device="cpu")
        assert got[name][1] == count
        assert got[name][0] == pytest.approx(loss, rel=1e-5)
    assert got["responses"][1] == (9 - 4) + (17 - 11) + (5 - 2) and got["all"][1] == 8 + 16 + 4 + 11
