"""Generate a reply for a prompt string rendered by the training template."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate_reply(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, stop_strings: tuple[str, ...] = (), streamer=None) -> str:
    """The model's continuation of `prompt`, cut at EOS or a stop string, without template markers.

    `temperature == 0` is greedy decoding.
    """
    device = next(p for p in model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             use_cache=True, streamer=streamer, **sampling)
    finally:
        model.train(was_training)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for stop in stop_strings:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text.strip()
