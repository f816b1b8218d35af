"""Perplexity of a causal LM on a text (or token ids), with windows of ``seq_len`` tokens.

With ``stride == seq_len`` (default) the text is cut into disjoint windows, each scored on its own
(as GPTQ / the MixLLM reference evaluate WikiText-2). With ``stride < seq_len`` windows overlap and
only each window's last ``stride`` tokens are scored, so every token is predicted once with up to
``seq_len - stride`` tokens of extra context.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    text_or_ids: Union[str, Sequence[int], torch.Tensor],
    seq_len: int = 512,
    stride: Optional[int] = None,
    tokenizer=None,
    max_tokens: Optional[int] = None,
    progress: bool = True,
) -> float:
    """``exp(mean NLL)`` over the scored tokens of ``text_or_ids``.

    ``text_or_ids``: a string (tokenized with ``tokenizer``) or a 1-D sequence / tensor of token ids
    (a [1, T] tensor is accepted). ``max_tokens`` truncates the token stream first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, v in (("seq_len", seq_len), ("stride", stride if stride is not None else seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    stride = seq_len if stride is None else stride
    if stride > seq_len:
        raise ValueError(f"stride ({stride}) must not exceed seq_len ({seq_len})")
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("tokenizer: required when text_or_ids is a string")
        ids = tokenizer(text_or_ids, return_tensors="pt").input_ids[0]
    elif isinstance(text_or_ids, torch.Tensor):
        ids = text_or_ids
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text_or_ids: expected 1-D integer token ids, got {tuple(ids.shape)} {ids.dtype}")
    elif isinstance(text_or_ids, (list, tuple)):
        ids = torch.as_tensor(text_or_ids, dtype=torch.int64)
        if ids.dim() != 1:
            raise ValueError("text_or_ids: expected a flat sequence of token ids")
    else:
        raise TypeError(f"text_or_ids: expected a str or token ids, got {type(text_or_ids).__name__}")
    ids = ids.long()
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens: expected an integer >= 2, got {max_tokens!r}")
        ids = ids[:max_tokens]
    T = ids.numel()
    if T < 2:
        raise ValueError(f"text_or_ids: need at least 2 tokens, got {T}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    starts = list(range(0, T - 1, stride)) if stride == seq_len else [0] + list(range(seq_len, T - 1, stride))
    try:
        for s in tqdm(starts, desc="perplexity", disable=not progress):
            if stride == seq_len or s == 0:
                lo, hi = s, min(s + seq_len, T)
                score_from = lo + 1
            else:  # overlapping window ending at s + stride; score its last `stride` tokens
                hi = min(s + stride, T)
                lo = max(0, hi - seq_len)
                score_from = s
            if hi - lo < 2:
                continue
            x = ids[lo:hi].to(device)[None]
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            tgt = x[0, 1:]
            tok_nll = -logp.gather(1, tgt[:, None])[:, 0]
            keep = tok_nll[(score_from - lo - 1) :]
            nll += float(keep.double().sum())
            count += keep.numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)
