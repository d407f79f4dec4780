"""Sampling from a trained model, so a person can see what it learned."""

from __future__ import annotations

import torch

from leanlm.engine.data.tokenizer import Tokenizer
from leanlm.engine.model import LLaMA


@torch.no_grad()
def sample(
    model: LLaMA,
    tok: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """Autoregressive sampling (temperature + top-k; temperature 0 = greedy). Returns prompt + continuation.

    The context is cropped to the model's ``max_seq_len``; there is no KV cache (this is a
    pretraining engine's sanity check, not an inference server).
    """
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt, bos=True)], dtype=torch.long, device=device)  # (1, T)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.max_seq_len :])[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        if nxt.item() == tok.eos_id:
            break
        ids = torch.cat([ids, nxt], dim=1)
    return tok.decode(ids[0, 1:].tolist())  # drop BOS
