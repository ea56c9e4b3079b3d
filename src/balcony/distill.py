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

from .model import BalconyModel, ExitOutputs


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
) -> DistillStats:
    """Loss statistics for one batch; with `backward=True` also backpropagates into the balconies.

    The gradient is that of sum_e weights[e] * sum_tokens KL_e / normalizer, so callers that
    split a global batch across micro-batches or ranks pass the global token count and get
    exactly the global-mean gradient when the pieces are summed.
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

    weight = model.parts.head.weight.detach().to(compute_dtype)
    bias = getattr(model.parts.head, "bias", None)
    bias = bias.detach().to(compute_dtype) if bias is not None else None
    cap_name = model.parts.spec.logit_softcap
    cap = getattr(model.base.config, cap_name, None) if cap_name else None
    stats = DistillStats(tokens=float(index.numel()))

    def head(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raw = F.linear(h.to(compute_dtype), weight, bias).float()
        if not cap:
            return raw, None
        squashed = torch.tanh(raw / cap)
        return squashed * cap, squashed

    def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # sum(a * b, -1) as a batched matmul: one pass, no [chunk, vocab] temporary
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)

    with torch.no_grad():
        for start in range(0, index.numel(), chunk_tokens):
            stop = min(start + chunk_tokens, index.numel())
            t_logits, _ = head(teacher[start:stop])
            t_top = None if backward else t_logits.argmax(-1)  # agreement is a validation figure
            logp_t = torch.log_softmax(t_logits, dim=-1)
            del t_logits
            p_t = logp_t.exp()
            neg_entropy = rowdot(p_t, logp_t)
            if labels is not None:
                lab = labels[start:stop]
                valid = lab >= 0
                stats.label_tokens += float(valid.sum())
                stats.teacher_ce += float(-logp_t.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)[valid].sum())
            del logp_t
            for e in exits:
                s_logits, squashed = head(students[e][start:stop])
                if t_top is not None:
                    stats.agree[e] = stats.agree.get(e, 0.0) + float((s_logits.argmax(-1) == t_top).sum())
                logp_s = torch.log_softmax(s_logits, dim=-1)
                del s_logits
                stats.kl[e] = stats.kl.get(e, 0.0) + float((neg_entropy - rowdot(p_t, logp_s)).sum())
                if labels is not None:
                    ce = -logp_s.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
                    stats.ce[e] = stats.ce.get(e, 0.0) + float(ce[valid].sum())
                if not backward:
                    continue
                # d KL / d logits = softmax(student) - p_teacher; d CE / d logits = softmax - onehot.
                # loss = sum_e w_e * (KL_e + ce_weight * CE_e), CE only where a next token exists.
                grad = logp_s.exp_()
                if ce_weight and labels is not None:
                    grad.mul_((1 + ce_weight * valid.to(grad.dtype))[:, None])
                    rows = valid.nonzero().squeeze(1)
                    grad[rows, lab[rows]] -= ce_weight
                grad.sub_(p_t)
                if squashed is not None:
                    grad.mul_(1 - squashed * squashed)
                # the scale goes on the small [chunk, hidden] product, not the [chunk, vocab] one
                grads[e][start:stop] = (grad.to(compute_dtype) @ weight).mul_(weights[e] / normalizer).to(grads[e].dtype)
                del grad, logp_s
    if backward:
        tensors = [students[e] for e in exits if students[e].requires_grad]
        if tensors:
            torch.autograd.backward(tensors, [grads[e] for e in exits if students[e].requires_grad])
    return stats
