"""The model's own answers to prompts: how every sampled source (`chat`, `reading`, `--data self`)
draws its text."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from ...core.exits import left_pad
from ...decoding.sampling import DrawnToken

TOP_K = 50  # transformers' default, which every sample so far (held-out chats, the corpus) was drawn with


@torch.no_grad()
def sample_answers(model, tokenizer, user_messages: list[str], *, max_new_tokens: int = 256,
                   temperature: float = 1.0, top_p: float = 0.95) -> list[tuple[str, str]]:
    """One batch: (each message as a user turn in the chat template, or plain text without one;
    the model's sampled answer). Empty answers are dropped."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
        if getattr(tokenizer, "chat_template", None) else m
        for m in user_messages
    ]
    # padded here with `pad`, so a tokenizer without a pad token (Llama's) samples too
    input_ids, attention_mask = left_pad(tokenizer(texts, add_special_tokens=False)["input_ids"], pad, model.device)
    # sampled by DrawnToken (inverse CDF over the top k) under greedy search: the distribution of
    # do_sample with generate's default top-k 50, which the held-out chats were sampled with too
    sampler = DrawnToken(temperature, top_p, top_k=TOP_K)
    gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         logits_processor=LogitsProcessorList([sampler]), temperature=None, top_p=None, top_k=None,
                         max_new_tokens=max_new_tokens, pad_token_id=pad)
    documents = []
    for prompt_text, row in zip(texts, gen[:, input_ids.shape[1]:]):
        new = row[row != pad].tolist() if pad != tokenizer.eos_token_id else until_eos(row, pad)
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        if answer:
            documents.append((prompt_text, answer))
    return documents



def until_eos(row: torch.Tensor, eos: int) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(eos)] if eos in ids else ids
