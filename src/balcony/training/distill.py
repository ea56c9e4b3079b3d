"""The self-distillation loss, computed in token chunks so no [batch, seq, vocab] tensor is held.

Per exit e and real token t: KL(p_full || p_e) at temperature 1, in fp32, averaged over real
(non-padding) tokens; exits combined with weights (the mean by default), plus an optional
cross-entropy term against the data.

The head and the two log-softmaxes dominate a step on small models (a 49k-row head is about
eight SmolLM2 layers), so they are done by hand: per chunk of tokens the teacher's
distribution is computed once and shared by every exit, and each exit's gradient with
respect to its logits is written down directly (softmax(student) - p_teacher) instead of
asking autograd to keep every chunk's logits alive. Autograd then only sees the balcony
layers: one `backward` from each exit's hidden states with the gradient gathered here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.model import BalconyModel, ExitOutputs


@dataclass
class DistillStats:
    """Sums over real tokens; divide by `tokens` for means (sums, so ranks and micro-batches add up)."""

    tokens: float = 0.0
    label_tokens: float = 0.0  # tokens with a next token to predict (for perplexity)
    kl: dict[int, float] = field(default_factory=dict)
    agree: dict[int, float] = field(default_factory=dict)
    ce: dict[int, float] = field(default_factory=dict)
    teacher_ce: float = 0.0

    def add(self, other: DistillStats) -> None:
        self.tokens += other.tokens
        self.label_tokens += other.label_tokens
        self.teacher_ce += other.teacher_ce
        for name in ("kl", "agree", "ce"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for e, v in theirs.items():
                mine[e] = mine.get(e, 0.0) + v

    def means(self) -> dict:
        n = max(self.tokens, 1.0)
        out = {"tokens": self.tokens}
        for e in sorted(self.kl):
            out[f"kl/{e}"] = self.kl[e] / n
            if e in self.agree:
                out[f"agreement/{e}"] = self.agree[e] / n
        return out

    def to_tensor(self, exits: list[int]) -> torch.Tensor:
        values = [self.tokens, self.teacher_ce, self.label_tokens]
        for e in exits:
            values += [self.kl.get(e, 0.0), self.agree.get(e, 0.0), self.ce.get(e, 0.0)]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, exits: list[int]) -> DistillStats:
        v = t.tolist()
        stats = cls(tokens=v[0], teacher_ce=v[1], label_tokens=v[2])
        for i, e in enumerate(exits):
            stats.kl[e], stats.agree[e], stats.ce[e] = v[3 + 3 * i : 6 + 3 * i]
        return stats


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels for the cross-entropy/perplexity terms: the next token, -100 where there is none."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def distill(
    model: BalconyModel,
    out: ExitOutputs,
    attention_mask: torch.Tensor | None,
    *,
    weights: dict[int, float],
    normalizer: float,
    ce_weight: float = 0.0,
    labels: torch.Tensor | None = None,
    chunk_tokens: int = 512,
    backward: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    topk: int = 0,
    vocab_samples: int = 2048,
    sample_seed: int = 0,
) -> DistillStats:
    """Loss statistics for one batch; with `backward=True` also backpropagates into the balconies.

    The gradient is that of sum_e weights[e] * sum_tokens KL_e / normalizer, so callers that
    split a global batch across micro-batches or ranks pass the global token count and get
    exactly the global-mean gradient when the pieces are summed.

    `topk` > 0 trains on a *sparse* KL instead of the exact one (see `sparse_kl`): the teacher's
    top-k tokens plus its tail mass, the student's normaliser estimated from `vocab_samples`
    random vocabulary rows (drawn from `sample_seed`, so a resumed run draws the same). The
    statistics then hold that KL; with `backward=False` (validation) the exact KL is always used.
    """
    exits = list(out.hidden)
    hidden_size = out.teacher_hidden.shape[-1]
    if attention_mask is None:
        index = torch.arange(out.teacher_hidden.shape[0] * out.teacher_hidden.shape[1], device=out.teacher_hidden.device)
    else:
        index = attention_mask.reshape(-1).nonzero().squeeze(1)
    teacher = out.teacher_hidden.reshape(-1, hidden_size).index_select(0, index)
    students = {e: out.hidden[e].reshape(-1, hidden_size).index_select(0, index) for e in exits}
    grads = {e: torch.zeros_like(s) for e, s in students.items()} if backward else {}
    if labels is not None:
        labels = labels.reshape(-1).index_select(0, index)

    head = _Head(model, compute_dtype)
    stats = DistillStats(tokens=float(index.numel()))
    if backward and topk > 0 and ce_weight:
        raise ValueError("the sparse KL (topk) has no cross-entropy term: train with ce_weight=0 or the exact KL")
    with torch.no_grad():
        for start in range(0, index.numel(), chunk_tokens):
            stop = min(start + chunk_tokens, index.numel())
            t_logits, _ = head(teacher[start:stop])
            t_top = None if backward else t_logits.argmax(-1)  # agreement is a validation figure
            logp_t = torch.log_softmax(t_logits, dim=-1)  # one fused pass: faster here than logsumexp alone
            del t_logits
            chunk = {e: students[e][start:stop] for e in exits}
            if backward and topk > 0:
                generator = torch.Generator().manual_seed(sample_seed * 1_000_003 + start)
                found = sparse_kl(logp_t, chunk, head.weight, head.bias, head.cap, topk, vocab_samples, generator,
                                  stats, weights, normalizer, compute_dtype)
            else:
                found = _exact_chunk(head, logp_t, chunk, None if labels is None else labels[start:stop], t_top, stats,
                                     weights, normalizer, ce_weight, backward)
            for e, grad in found.items():
                grads[e][start:stop] = grad.to(grads[e].dtype)
    if backward:
        tensors = [students[e] for e in exits if students[e].requires_grad]
        if tensors:
            torch.autograd.backward(tensors, [grads[e] for e in exits if students[e].requires_grad])
    return stats


class _Head:
    """The shared head in the compute dtype, and the base's soft-cap after it (Gemma 2)."""

    def __init__(self, model: BalconyModel, compute_dtype: torch.dtype):
        self.weight = model.parts.head.weight.detach().to(compute_dtype)
        bias = getattr(model.parts.head, "bias", None)
        self.bias = bias.detach().to(compute_dtype) if bias is not None else None
        cap_name = model.parts.spec.logit_softcap
        self.cap = getattr(model.base.config, cap_name, None) if cap_name else None
        self.compute_dtype = compute_dtype

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 logits, and tanh(raw / cap) when capped (its derivative is needed in backward)."""
        raw = F.linear(h.to(self.compute_dtype), self.weight, self.bias).float()
        if not self.cap:
            return raw, None
        squashed = torch.tanh(raw / self.cap)
        return squashed * self.cap, squashed


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # sum(a * b, -1) as a batched matmul: one pass, no [chunk, vocab] temporary
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _exact_chunk(head: _Head, logp_t: torch.Tensor, students: dict[int, torch.Tensor], lab: torch.Tensor | None,
                 t_top: torch.Tensor | None, stats: DistillStats, weights: dict[int, float], normalizer: float,
                 ce_weight: float, backward: bool) -> dict[int, torch.Tensor]:
    """The full-vocabulary KL (and CE) of one chunk for every exit; with `backward`, the gradient
    with respect to each exit's hidden states, scaled by weights[e] / normalizer."""
    p_t = logp_t.exp()
    neg_entropy = _rowdot(p_t, logp_t)
    valid = None
    if lab is not None:
        valid = lab >= 0
        stats.label_tokens += float(valid.sum())
        stats.teacher_ce += float(-logp_t.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)[valid].sum())
    grads = {}
    for e, hidden in students.items():
        s_logits, squashed = head(hidden)
        if t_top is not None:
            stats.agree[e] = stats.agree.get(e, 0.0) + float((s_logits.argmax(-1) == t_top).sum())
        logp_s = torch.log_softmax(s_logits, dim=-1)
        del s_logits
        stats.kl[e] = stats.kl.get(e, 0.0) + float((neg_entropy - _rowdot(p_t, logp_s)).sum())
        if lab is not None:
            ce = -logp_s.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
            stats.ce[e] = stats.ce.get(e, 0.0) + float(ce[valid].sum())
        if not backward:
            continue
        # d KL / d logits = softmax(student) - p_teacher; d CE / d logits = softmax - onehot.
        # loss = sum_e w_e * (KL_e + ce_weight * CE_e), CE only where a next token exists.
        grad = logp_s.exp_()
        if ce_weight and lab is not None:
            grad.mul_((1 + ce_weight * valid.to(grad.dtype))[:, None])
            rows = valid.nonzero().squeeze(1)
            grad[rows, lab[rows]] -= ce_weight
        grad.sub_(p_t)
        if squashed is not None:
            grad.mul_(1 - squashed * squashed)
        # the scale goes on the small [chunk, hidden] product, not the [chunk, vocab] one
        grads[e] = (grad.to(head.compute_dtype) @ head.weight).mul_(weights[e] / normalizer)
        del grad, logp_s
    return grads


def sparse_kl(logp_t: torch.Tensor, students: dict[int, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
              cap: float | None, topk: int, samples: int, generator: torch.Generator, stats: DistillStats,
              weights: dict[int, float], normalizer: float, compute_dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """The KL between coarsened distributions: the teacher's top-k tokens and one bucket for the rest.

    The student's logits are computed only for those k tokens (per token) and for `samples`
    vocabulary rows drawn uniformly without replacement (shared by the chunk), which estimate
    its probability mass outside the top k: exp-sum over the drawn rows not in a token's top k,
    scaled by (V - k) / (rows drawn outside it). So each exit's head costs (k + samples) rows
    instead of V. Every exit runs in one graph, so the k head rows each token gathers are read once
    for all exits. Returns the gradient with respect to each exit's hidden states, scaled as the
    exact path scales it (weights[e] / normalizer).
    """
    vocab, device = weight.shape[0], logp_t.device
    top_logp, top_ids = logp_t.topk(topk, dim=-1)  # [chunk, k]
    p_top = top_logp.exp()
    tail = (1 - p_top.sum(-1)).clamp(min=1e-9)  # teacher mass outside its top k
    drawn = torch.randperm(vocab, generator=generator)[:samples].to(device)
    # which drawn rows fall in each token's top k: each top-k id's slot among the drawn (or a spare one)
    slot = torch.full((vocab,), samples, dtype=torch.long, device=device)
    slot[drawn] = torch.arange(samples, device=device)
    in_top = torch.zeros(top_ids.shape[0], samples + 1, dtype=torch.bool, device=device).scatter_(1, slot[top_ids], True)
    in_top = in_top[:, :samples]
    outside = (~in_top).sum(-1).clamp(min=1)
    log_scale = torch.log((vocab - topk) / outside.to(logp_t.dtype))
    w_top = weight[top_ids]  # [chunk, k, hidden]: the k rows of the head each token needs
    w_drawn = weight[drawn]
    teacher_term = (p_top * top_logp).sum(-1) + tail * tail.log()  # sum p log p over the coarse buckets
    exits = list(students)
    scale = torch.tensor([weights[e] / normalizer for e in exits], device=device)
    with torch.enable_grad():
        h = torch.stack([students[e].detach().to(compute_dtype) for e in exits]).requires_grad_(True)  # [E, chunk, hidden]
        z_top = torch.bmm(w_top, h.permute(1, 2, 0)).permute(2, 0, 1).float()  # [E, chunk, k]
        z_drawn = F.linear(h, w_drawn).float()  # [E, chunk, samples]
        if bias is not None:
            z_top, z_drawn = z_top + bias[top_ids].float(), z_drawn + bias[drawn].float()
        if cap:
            z_top, z_drawn = torch.tanh(z_top / cap) * cap, torch.tanh(z_drawn / cap) * cap
        log_tail = torch.logsumexp(z_drawn.masked_fill(in_top, float("-inf")), dim=-1) + log_scale
        log_z = torch.logsumexp(torch.cat([z_top, log_tail[..., None]], dim=-1), dim=-1)
        cross = (p_top * (z_top - log_z[..., None])).sum(-1) + tail * (log_tail - log_z)
        kl = teacher_term - cross  # [E, chunk]
        (grad,) = torch.autograd.grad((kl.sum(-1) * scale).sum(), h)
    for i, e in enumerate(exits):
        stats.kl[e] = stats.kl.get(e, 0.0) + float(kl[i].detach().sum())
    return {e: grad[i] for i, e in enumerate(exits)}
