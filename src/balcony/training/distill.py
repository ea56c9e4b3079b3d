"""The self-distillation loss, computed in token chunks so no [batch, seq, vocab] tensor is held.

Per exit e and real token t: KL(p_full || p_e) at temperature 1, in fp32, averaged over real
(non-padding) tokens; exits combined with weights (the mean by default), plus optional
cross-entropy terms against the data and against the teacher's top-1 token (greedy decoding
and speculative acceptance follow the top 1, which the KL weighs no more than the rest).

The head and the two log-softmaxes dominate a step on small models (a 49k-row head is about
eight SmolLM2 layers), so they are done by hand: per chunk of tokens the teacher's
distribution is computed once and shared by every exit, and each exit's gradient with
respect to its logits is written down directly (softmax(student) - p_teacher) instead of
asking autograd to keep every chunk's logits alive. Autograd then only sees the balcony
layers: one `backward` from each exit's hidden states with the gradient gathered here.

A method that trains its own copy of the head (LayerSkip, `student_head=`) scores the exits
with that head instead of the teacher's; its weight gradient is gathered chunk by chunk the
same way (grad_logits^T @ hidden) and handed to that one `backward` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import BalconyModel, ExitOutputs
from ..decoding.sampling import draw
from .config import LossOptions


@dataclass
class DistillStats:
    """Sums over real tokens; divide by `tokens` for means (sums, so ranks and micro-batches add up)."""

    tokens: float = 0.0
    label_tokens: float = 0.0  # tokens with a next token to predict (for perplexity)
    kl: dict[int, float] = field(default_factory=dict)
    agree: dict[int, float] = field(default_factory=dict)
    ce: dict[int, float] = field(default_factory=dict)
    teacher_ce: float = 0.0
    recall_tokens: float = 0.0  # validation: tokens at recall positions (see `recall_positions`)
    recall_agree: dict[int, float] = field(default_factory=dict)

    def add(self, other: DistillStats) -> None:
        self.tokens += other.tokens
        self.label_tokens += other.label_tokens
        self.teacher_ce += other.teacher_ce
        self.recall_tokens += other.recall_tokens
        for name in ("kl", "agree", "ce", "recall_agree"):
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
            if self.recall_tokens:
                out[f"recall_agreement/{e}"] = self.recall_agree.get(e, 0.0) / self.recall_tokens
        return out

    def to_tensor(self, exits: list[int]) -> torch.Tensor:
        values = [self.tokens, self.teacher_ce, self.label_tokens, self.recall_tokens]
        for e in exits:
            values += [self.kl.get(e, 0.0), self.agree.get(e, 0.0), self.ce.get(e, 0.0), self.recall_agree.get(e, 0.0)]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, exits: list[int]) -> DistillStats:
        v = t.tolist()
        stats = cls(tokens=v[0], teacher_ce=v[1], label_tokens=v[2], recall_tokens=v[3])
        for i, e in enumerate(exits):
            stats.kl[e], stats.agree[e], stats.ce[e], stats.recall_agree[e] = v[4 + 4 * i : 8 + 4 * i]
        return stats


# The data's most frequent tokens never count as recalled: a "the" seen before is no recall.
COMMON_TOKENS = 300


def common_tokens(rows: torch.Tensor, vocab_size: int, n: int = COMMON_TOKENS) -> torch.Tensor:
    """A [vocab] mask of the `n` tokens most frequent in `rows` (the training data)."""
    counts = torch.bincount(rows.reshape(-1), minlength=vocab_size)
    mask = torch.zeros(counts.numel(), dtype=torch.bool)
    mask[counts.topk(min(n, counts.numel())).indices] = True
    return mask


def recall_positions(ids: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
    """[batch, seq] mask of the positions whose next token is not a common one and already
    appeared earlier in the row: in-context recall, what LAMBADA's last word asks of a model and
    what a shallow exit does worst (a held-out LAMBADA word ranks ~550th at exit 15 of `default`)."""
    batch, seq = ids.shape
    positions = torch.arange(seq, device=ids.device).expand(batch, seq)
    # each token's first position in its row (seq where absent): memory in the vocabulary, not seq^2
    first = torch.full((batch, common.numel()), seq, device=ids.device).scatter_reduce_(1, ids, positions, "amin")
    found = torch.zeros_like(ids, dtype=torch.bool)
    found[:, :-1] = (first.gather(1, ids[:, 1:]) <= positions[:, :-1]) & ~common.to(ids.device)[ids[:, 1:]]
    return found


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels for the cross-entropy/perplexity terms: the next token, -100 where there is none."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def distill(
    model: BalconyModel,
    out: ExitOutputs,
    attention_mask: torch.Tensor | None,
    loss: LossOptions | None = None,
    *,
    normalizer: float,
    backward: bool = True,
    labels: torch.Tensor | None = None,
    recall: torch.Tensor | None = None,
    teacher_top: TeacherTop | None = None,
    sample_seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    student_head: nn.Module | None = None,
) -> DistillStats:
    """Loss statistics for one batch; with `backward=True` also backpropagates into the balconies.

    The gradient is that of sum_e weight_e * sum_tokens KL_e / normalizer (`loss.exit_weights`,
    the mean by default), so callers that split a global batch across micro-batches or ranks
    pass the global token count and get exactly the global-mean gradient when the pieces are summed.

    `loss.kl_topk` > 0 trains on a *sparse* KL instead of the exact one (see `sparse_kl`): the
    teacher's top-k tokens plus its tail mass, the student's normaliser estimated from
    `loss.kl_samples` random vocabulary rows (drawn from `sample_seed`, so a resumed run draws the
    same), and with `loss.kl_tail_samples` > 0 the teacher's remainder sampled too. The statistics
    then hold that KL; with `backward=False` (validation) the exact KL is always used.
    `teacher_top` hands it what it needs of the teacher (`teacher_topk`'s result, e.g. from a
    `TeacherCache`): then `out.teacher_hidden` is not needed.

    `loss.top1_weight` adds that much CE against the teacher's argmax per token to the loss (not to
    the statistics' KL). `labels` (`next_token_labels`) serve `loss.ce_weight` and perplexity.
    `recall` ([batch, seq] booleans, from `recall_positions`) weighs each marked token's loss
    1 + `loss.recall_weight`; validation counts agreement there.

    `student_head`: the head (a linear layer) that scores the exits when it is not the teacher's
    own (LayerSkip trains a copy of the whole model); with `backward=True` it gets its gradient.
    """
    loss = loss or LossOptions()
    index = _real_tokens(out, attention_mask)
    students = {e: h.reshape(-1, h.shape[-1]).index_select(0, index) for e, h in out.hidden.items()}
    labels, recall = (None if x is None else x.reshape(-1).index_select(0, index) for x in (labels, recall))
    stats = DistillStats(tokens=float(index.numel()), recall_tokens=0.0 if recall is None else float(recall.sum()))
    sparse = backward and loss.kl_topk > 0
    if sparse and loss.ce_weight:
        raise ValueError("the sparse KL (topk) has no cross-entropy term: train with ce_weight=0 or the exact KL")
    if sparse and teacher_top is None:
        teacher_top = teacher_topk(model, out, attention_mask, loss.kl_topk, tail_samples=loss.kl_tail_samples,
                                   seeds=[sample_seed], chunk_tokens=loss.chunk_tokens, compute_dtype=compute_dtype)
    if backward and student_head is not None and recall is not None and loss.recall_weight:
        raise ValueError("recall_weight weighs the exits' hidden states only: a trained head (student_head) takes none")
    teacher = teacher_top if sparse else _flat(out.teacher_hidden).index_select(0, index)
    head = _Head(model, compute_dtype)
    heads = (head, head if student_head is None else _Head(model, compute_dtype, student_head, trainable=backward))
    grads = _chunk_by_chunk(heads, teacher, students, labels, recall, stats, loss,
                            normalizer=normalizer, backward=backward, sample_seed=sample_seed)
    if backward:
        _backward(students, grads, heads[1])
    return stats


def _backward(students: dict[int, torch.Tensor], grads: dict[int, torch.Tensor], head: _Head) -> None:
    """One backward from every exit's hidden states with the gradients gathered chunk by chunk,
    and a trained head's weight (and bias) as leaves with theirs."""
    keys = [e for e in students if students[e].requires_grad]
    tensors, wanted = [students[e] for e in keys], [grads[e] for e in keys]
    for param, grad in head.gradients():
        tensors.append(param)
        wanted.append(grad.to(param.dtype))
    if tensors:
        torch.autograd.backward(tensors, wanted)


def _chunk_by_chunk(heads: tuple[_Head, _Head], teacher: torch.Tensor | TeacherTop, students: dict[int, torch.Tensor],
                    labels: torch.Tensor | None, recall: torch.Tensor | None, stats: DistillStats, loss: LossOptions, *,
                    normalizer: float, backward: bool, sample_seed: int) -> dict[int, torch.Tensor]:
    """`distill`'s loss over chunks of tokens (the teacher's hidden states, or its sparse top k):
    adds to `stats`, and returns the gradient with respect to each exit's flat hidden states.
    `heads`: the teacher's head and the one that scores the exits (the same one but for LayerSkip)."""
    exits = list(students)
    weights = loss.weights(exits)
    grads = {e: torch.zeros_like(s) for e, s in students.items()} if backward else {}
    tokens = next(iter(students.values())).shape[0]
    with torch.no_grad():
        for start in range(0, tokens, loss.chunk_tokens):
            stop = min(start + loss.chunk_tokens, tokens)
            chunk = {e: students[e][start:stop] for e in exits}
            if isinstance(teacher, TeacherTop):
                generator = torch.Generator().manual_seed(sample_seed * 1_000_003 + start)
                found = sparse_kl(teacher[start:stop], chunk, heads[1], loss.kl_samples, generator, stats, weights,
                                  normalizer, loss.top1_weight)
            else:
                found = _exact_chunk(heads, teacher[start:stop], chunk, None if labels is None else labels[start:stop],
                                     stats, weights, normalizer, loss, backward,
                                     None if recall is None else recall[start:stop])
            # the loss is a sum over tokens, so weighting a token's loss weights its gradient row
            rows = None if recall is None or not loss.recall_weight else 1 + loss.recall_weight * recall[start:stop, None]
            for e, grad in found.items():
                grads[e][start:stop] = grad.to(grads[e].dtype) if rows is None else grad.mul(rows).to(grads[e].dtype)
    return grads


@dataclass
class TeacherTop:
    """What the sparse KL needs of the teacher, per real token: its top k log-probs and ids, ids
    drawn from its distribution outside the top k (the sampled remainder; none for the coarse
    KL), and sum p log p over that remainder (estimated from those draws; it sets the KL's value,
    not its gradient)."""

    logp: torch.Tensor  # [tokens, k]
    ids: torch.Tensor  # [tokens, k]
    tail_ids: torch.Tensor  # [tokens, m]
    tail_plogp: torch.Tensor  # [tokens]

    def __getitem__(self, rows: slice) -> TeacherTop:
        return TeacherTop(*(getattr(self, f.name)[rows] for f in fields(self)))

    def to(self, device: torch.device) -> TeacherTop:
        return TeacherTop(*(getattr(self, f.name).to(device) for f in fields(self)))


@torch.no_grad()
def teacher_topk(model: BalconyModel, out: ExitOutputs, attention_mask: torch.Tensor | None, k: int, *,
                 tail_samples: int = 0, seeds: list[int] | None = None, chunk_tokens: int = 512,
                 compute_dtype: torch.dtype = torch.float32) -> TeacherTop:
    """The teacher's part of the sparse KL at each real token, in the order `distill` flattens a
    batch. The remainder is drawn with one generator per seed: the batch's rows split evenly
    among `seeds` (one seed per row makes a row's draws its own, whatever batch it is in)."""
    head = _Head(model, compute_dtype)
    teacher = _flat(out.teacher_hidden).index_select(0, _real_tokens(out, attention_mask))
    parts = torch.tensor_split(torch.arange(teacher.shape[0]), len(seeds or [0]))
    uniform = torch.cat([torch.rand(len(part), tail_samples, generator=torch.Generator().manual_seed(seed))
                         for part, seed in zip(parts, seeds or [0])])
    found = []
    for start in range(0, teacher.shape[0], chunk_tokens):
        # probabilities, and logs of the few that are kept: the draws need them, and each pass over
        # [chunk, vocab] costs as much as the next (exp, cumulative sum, ...)
        p = torch.softmax(head(teacher[start : start + chunk_tokens])[0], dim=-1)
        top = p.topk(k, dim=-1)
        if tail_samples:
            tail_ids = draw(p.scatter_(1, top.indices, 0.0), uniform=uniform[start : start + chunk_tokens])
            # sum p log p over the remainder, estimated from the same draws (a pass over the vocabulary less)
            tail_plogp = (1 - top.values.sum(-1)) * _log(p.gather(1, tail_ids)).mean(-1)
        else:
            tail_ids, tail_plogp = top.indices[:, :0], torch.zeros_like(top.values[:, 0])
        found.append(TeacherTop(_log(top.values), top.indices, tail_ids, tail_plogp))
    return TeacherTop(*(torch.cat([getattr(t, f.name) for t in found]) for f in fields(TeacherTop)))


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()  # a probability that underflowed weighs nothing anyway


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


def _real_tokens(out: ExitOutputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Flat positions of the real (non-padding) tokens of a batch."""
    if attention_mask is not None:
        return attention_mask.reshape(-1).nonzero().squeeze(1)
    some = next(iter(out.hidden.values()), out.teacher_hidden)  # the teacher alone: no exits (a cache fill)
    return torch.arange(some.shape[0] * some.shape[1], device=some.device)


class _Head:
    """The shared head in the compute dtype, and the base's soft-cap after it (Gemma 2).

    `trainable`: the head trains (LayerSkip's copy), so its weight (and bias) gradient is summed
    here, chunk by chunk, in fp32 (`accumulate`), and handed to the backward (`gradients`).
    """

    def __init__(self, model: BalconyModel, compute_dtype: torch.dtype, head: nn.Module | None = None,
                 trainable: bool = False):
        head = model.parts.head if head is None else head
        self.weight = head.weight.detach().to(compute_dtype)
        bias = getattr(head, "bias", None)
        self.bias = bias.detach().to(compute_dtype) if bias is not None else None
        cap_name = model.parts.spec.logit_softcap
        self.cap = getattr(model.base.config, cap_name, None) if cap_name else None
        self.compute_dtype = compute_dtype
        self.params = [p for p in (head.weight, bias) if p is not None] if trainable else []
        self.grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]

    @property
    def trainable(self) -> bool:
        return bool(self.params)

    def accumulate(self, grad_logits: torch.Tensor, hidden: torch.Tensor, scale: float) -> None:
        """Add the head's gradient for one chunk: scale * grad_logits^T @ hidden (and the bias's row sums)."""
        self.grads[0].addmm_(grad_logits.float().t(), hidden.float(), alpha=scale)
        if len(self.grads) > 1:
            self.grads[1].add_(grad_logits.float().sum(0), alpha=scale)

    def add_rows(self, ids: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Add gradients of gathered head rows (`weight[ids[i]]`, then `bias[ids[i]]` when there is a bias)."""
        for i, grad in enumerate(grads):
            index = ids[i % len(ids)].reshape(-1)
            target = self.grads[i // len(ids)]
            target.index_add_(0, index, grad.float().reshape(index.numel(), *target.shape[1:]))

    def gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.params, self.grads))

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


def _exact_chunk(heads: tuple[_Head, _Head], teacher: torch.Tensor, students: dict[int, torch.Tensor], lab: torch.Tensor | None,
                 stats: DistillStats, weights: dict[int, float], normalizer: float, loss: LossOptions, backward: bool,
                 recall: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """The full-vocabulary KL (and CE) of one chunk for every exit, against the teacher's hidden
    states `teacher`; with `backward`, the gradient with respect to each exit's hidden states,
    scaled by weights[e] / normalizer, of KL + ce_weight * CE(data labels) + top1_weight * CE(teacher's top 1)."""
    ce_weight, top1_weight = loss.ce_weight, loss.top1_weight
    head = heads[1]  # the exits' (the student's); heads[0] is the teacher's
    t_logits, _ = heads[0](teacher)
    # the teacher's top 1: for agreement (a validation figure) and the top-1 term
    t_top = t_logits.argmax(-1) if not backward or top1_weight else None
    logp_t = torch.log_softmax(t_logits, dim=-1)  # one fused pass: faster here than logsumexp alone
    del t_logits
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
        if not backward:
            same = s_logits.argmax(-1) == t_top
            stats.agree[e] = stats.agree.get(e, 0.0) + float(same.sum())
            if recall is not None:
                stats.recall_agree[e] = stats.recall_agree.get(e, 0.0) + float((same & recall).sum())
        logp_s = torch.log_softmax(s_logits, dim=-1)
        del s_logits
        stats.kl[e] = stats.kl.get(e, 0.0) + float((neg_entropy - _rowdot(p_t, logp_s)).sum())
        if lab is not None:
            ce = -logp_s.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
            stats.ce[e] = stats.ce.get(e, 0.0) + float(ce[valid].sum())
        if not backward:
            continue
        # d KL / d logits = softmax(student) - p_teacher; d CE / d logits = softmax - onehot.
        # loss = sum_e w_e * (KL_e + ce_weight * CE_e + top1_weight * CE_top1_e), CE only where a
        # next token exists.
        grad = logp_s.exp_()
        with_labels = bool(ce_weight) and lab is not None
        if with_labels:
            grad.mul_((1 + top1_weight + ce_weight * valid.to(grad.dtype))[:, None])
            rows = valid.nonzero().squeeze(1)
            grad[rows, lab[rows]] -= ce_weight
        elif top1_weight:
            grad.mul_(1 + top1_weight)
        if top1_weight:
            grad[torch.arange(grad.shape[0], device=grad.device), t_top] -= top1_weight
        grad.sub_(p_t)
        if squashed is not None:
            grad.mul_(1 - squashed * squashed)
        # the scale goes on the small [chunk, hidden] product, not the [chunk, vocab] one
        grads[e] = (grad.to(head.compute_dtype) @ head.weight).mul_(weights[e] / normalizer)
        if head.trainable:
            head.accumulate(grad, hidden, weights[e] / normalizer)
        del grad, logp_s
    return grads


def sparse_kl(teacher: TeacherTop, students: dict[int, torch.Tensor], head: _Head, samples: int,
              generator: torch.Generator, stats: DistillStats, weights: dict[int, float], normalizer: float,
              top1_weight: float = 0.0) -> dict[int, torch.Tensor]:
    """The KL over the teacher's top k tokens plus its remainder, with the student's head run on
    few rows.

    The student's logits are computed for each token's top k, for its m remainder ids (drawn
    from the teacher's distribution outside the top k), and for `samples` vocabulary rows drawn
    uniformly without replacement (shared by the chunk) that estimate the student's normaliser:
    its exp-sum over the drawn rows outside a token's top k, scaled by (V - k) / (rows drawn
    outside it). With m > 0 the remainder's cross term sum_j p_j log q_j is estimated as
    p_rest * mean(log q) over the drawn ids: the exact KL in expectation, so the student also
    learns the shape of the teacher's tail. With m = 0 the remainder is one bucket (a coarser KL
    that leaves the within-tail part, 7-15% of the KL at the default model's exits, untrained).
    Each exit's head costs k + m + samples rows instead of V; every exit runs in one graph, so the
    rows each token gathers are read once for all exits. Returns the gradient with respect to
    each exit's hidden states, scaled as the exact path scales it (weights[e] / normalizer); a
    trained `head` gets its gathered rows' gradients too. `top1_weight` adds that much of the CE
    against the teacher's top 1 (the first of its top k) to the loss, with the same normaliser.
    """
    weight, bias, cap = head.weight, head.bias, head.cap
    teacher = teacher.to(weight.device)  # a cached teacher comes from the CPU
    vocab, device, topk = weight.shape[0], weight.device, teacher.logp.shape[-1]
    top_logp, top_ids, tail_ids = teacher.logp, teacher.ids, teacher.tail_ids  # [chunk, k], [chunk, k], [chunk, m]
    p_top = top_logp.exp()
    tail = (1 - p_top.sum(-1)).clamp(min=1e-9)  # teacher mass outside its top k
    drawn = torch.randperm(vocab, generator=generator)[:samples].to(device)
    in_top = _drawn_in_top(top_ids, drawn, vocab)
    outside = (~in_top).sum(-1).clamp(min=1)
    log_scale = torch.log((vocab - topk) / outside.to(top_logp.dtype))
    own = torch.cat([top_ids, tail_ids], dim=-1)
    # the rows of the head each token needs ([chunk, k + m, hidden]), and the drawn ones
    rows = [weight[own], weight[drawn]] + ([bias[own], bias[drawn]] if bias is not None else [])
    sampled_tail = tail_ids.shape[-1] > 0
    # sum p log p: exact over the remainder, or over the one bucket it is coarsened to
    teacher_term = (p_top * top_logp).sum(-1) + (teacher.tail_plogp if sampled_tail else tail * tail.log())
    exits = list(students)
    scale = torch.tensor([weights[e] / normalizer for e in exits], device=device)
    with torch.enable_grad():  # a trained head's rows this chunk reads are leaves: its gradient lands there alone
        rows = [r.requires_grad_(head.trainable) for r in rows]
        h = torch.stack([students[e].detach().to(head.compute_dtype) for e in exits]).requires_grad_(True)  # [E, chunk, hidden]
        z_own = torch.bmm(rows[0], h.permute(1, 2, 0)).permute(2, 0, 1).float()  # [E, chunk, k + m]
        z_drawn = F.linear(h, rows[1]).float()  # [E, chunk, samples]
        if bias is not None:
            z_own, z_drawn = z_own + rows[2].float(), z_drawn + rows[3].float()
        if cap:
            z_own, z_drawn = torch.tanh(z_own / cap) * cap, torch.tanh(z_drawn / cap) * cap
        z_top, z_tail = z_own[..., :topk], z_own[..., topk:]
        log_tail = torch.logsumexp(z_drawn.masked_fill(in_top, float("-inf")), dim=-1) + log_scale
        log_z = torch.logsumexp(torch.cat([z_top, log_tail[..., None]], dim=-1), dim=-1)
        rest = z_tail.mean(-1) if sampled_tail else log_tail  # the remainder's log-mass per unit teacher mass
        cross = (p_top * (z_top - log_z[..., None])).sum(-1) + tail * (rest - log_z)
        kl = teacher_term - cross  # [E, chunk]
        loss = kl + top1_weight * (log_z - z_top[..., 0]) if top1_weight else kl
        grad, *row_grads = torch.autograd.grad((loss.sum(-1) * scale).sum(), [h, *rows] if head.trainable else [h])
    if row_grads:
        head.add_rows([own, drawn], row_grads)
    for i, e in enumerate(exits):
        stats.kl[e] = stats.kl.get(e, 0.0) + float(kl[i].detach().sum())
    return {e: grad[i] for i, e in enumerate(exits)}


def _drawn_in_top(top_ids: torch.Tensor, drawn: torch.Tensor, vocab: int) -> torch.Tensor:
    """[tokens, samples]: whether each drawn vocabulary row is among each token's top k."""
    samples, device = drawn.numel(), drawn.device
    # each top-k id's slot among the drawn rows, or a spare slot past them
    slot = torch.full((vocab,), samples, dtype=torch.long, device=device)
    slot[drawn] = torch.arange(samples, device=device)
    in_top = torch.zeros(top_ids.shape[0], samples + 1, dtype=torch.bool, device=device).scatter_(1, slot[top_ids], True)
    return in_top[:, :samples]
