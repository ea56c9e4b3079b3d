"""Self-distillation: the loss, its chunked gradient, the training loop, checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, tiny_base, tiny_tokenizer, write_corpus

from balcony import BalconyModel
from balcony.training.data import PackedData
from balcony.training.config import LossOptions, TrainConfig
from balcony.training.distill import common_tokens, distill, recall_positions
from balcony.training.trainer import Trainer, TrainingInterrupted


def ids(batch=2, length=16, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def kl_of(model, x, mask=None):
    out = model.forward_exits(x, attention_mask=mask)
    stats = distill(model, out, mask, normalizer=1.0, backward=False)
    return stats


def test_loss_is_zero_when_the_balcony_continues_the_trunk(arch):
    # A balcony at exit L-1 initialised as a copy of layer L-1 and the final norm *is* the full model.
    model = BalconyModel.from_base(tiny_base(arch), exits=[NUM_LAYERS - 1, 2], init="copy")
    stats = kl_of(model, ids())
    assert abs(stats.kl[NUM_LAYERS - 1]) < 1e-5 and stats.agree[NUM_LAYERS - 1] == stats.tokens
    assert stats.kl[2] > 1e-3
    random = BalconyModel.from_base(tiny_base(arch), exits=[NUM_LAYERS - 1], init="random")
    assert kl_of(random, ids()).kl[NUM_LAYERS - 1] > 1e-3


@pytest.mark.parametrize("arch_name", ["llama", "gemma2"])  # gemma2: soft-capped logits
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_chunked_gradient_equals_autograd(arch_name, ce_weight):
    model = BalconyModel.from_base(tiny_base(arch_name), exits=[2, 4], init="random")
    x = ids(length=12)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    labels[mask == 0] = -100
    weights = {2: 0.3, 4: 0.7}
    n = float(mask.sum())

    out = model.forward_exits(x, attention_mask=mask, return_logits=True)
    real = mask.bool()
    reference = 0.0
    p_t = torch.log_softmax(out.teacher_logits.float(), -1)
    for e, w in weights.items():
        logp_s = torch.log_softmax(out.logits[e].float(), -1)
        kl = (p_t.exp() * (p_t - logp_s)).sum(-1)[real].sum()
        valid = labels >= 0
        ce = -logp_s.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[valid].sum()
        reference = reference + w * (kl + ce_weight * ce) / n
    reference.backward()
    expected = {k: p.grad.clone() for k, p in model.balconies.named_parameters()}
    model.zero_grad()

    out = model.forward_exits(x, attention_mask=mask)
    loss = LossOptions(exit_weights=list(weights.values()), ce_weight=ce_weight, chunk_tokens=7)
    stats = distill(model, out, mask, loss, normalizer=n, labels=labels)
    for k, p in model.balconies.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], atol=1e-6, rtol=1e-4, msg=k)
    assert stats.tokens == n
    assert not any(p.grad is not None for p in model.base.parameters())


def test_padding_does_not_change_the_loss(arch):
    model = BalconyModel.from_base(tiny_base(arch), exits=[2, 4], init="random")
    seq = ids(batch=1, length=10, seed=3)
    alone = kl_of(model, seq)
    for side in ("left", "right"):
        padded = torch.zeros(2, 14, dtype=torch.long)
        mask = torch.zeros_like(padded)
        other = ids(batch=1, length=14, seed=4)[0]
        padded[1], mask[1] = other, 1
        if side == "left":
            padded[0, 4:], mask[0, 4:] = seq[0], 1
        else:
            padded[0, :10], mask[0, :10] = seq[0], 1
        both = kl_of(model, padded, mask)
        other_alone = kl_of(model, other[None])
        for e in (2, 4):
            assert both.kl[e] == pytest.approx(alone.kl[e] + other_alone.kl[e], rel=1e-4, abs=1e-5), (side, e)
        assert both.tokens == 24


def corpus_data(tmp_path, seq_len=24):
    from balcony.training.data import build_dataset

    path = write_corpus(tmp_path / "corpus.txt", documents=60)
    return build_dataset(str(path), tiny_tokenizer(), seq_len, val_fraction=0.1)


def make_trainer(tmp_path, data, **options):
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], tokenizer=tiny_tokenizer())
    defaults = dict(out=str(tmp_path / "run"), seq_len=data.train.shape[1], batch_size=4, lr=3e-3, eval_every=5,
                    checkpoint_every=1000, progress=False, seed=0)
    defaults.update(options)
    return Trainer(TrainConfig.from_flat(**defaults), model=model, data=data)


def test_training_lowers_validation_kl_at_every_exit_and_leaves_the_base_alone(tmp_path):
    data = corpus_data(tmp_path)
    trainer = make_trainer(tmp_path, data, max_steps=15)
    before = {k: v.clone() for k, v in trainer.model.base.state_dict().items()}
    trainer.fit()
    after = trainer.model.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 15
    for e in (2, 4):
        assert val[-1][f"kl/{e}"] < 0.8 * val[0][f"kl/{e}"], e
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 15 and all(r["tokens_per_second"] > 0 for r in train)
    # the output folder is a normal artifact
    loaded = BalconyModel.from_pretrained(tmp_path / "run", base=tiny_base("llama"))
    x = ids()
    assert torch.equal(loaded(x, exit_layer=2).logits, trainer.model(x, exit_layer=2).logits)


@pytest.mark.parametrize("arch_name", ["llama", "gemma2"])  # gemma2: soft-capped logits
@pytest.mark.parametrize("tail_samples", [0, 3])
def test_sparse_kl_over_the_whole_vocabulary_is_the_exact_kl(arch_name, tail_samples):
    """Top V-1 tokens plus every row drawn: the sparse KL is the exact KL, and so is its gradient."""
    grads, kls = [], []
    for topk in (0, VOCAB - 1):
        model = BalconyModel.from_base(tiny_base(arch_name), exits=[2, 4], init="random")
        out = model.forward_exits(ids(length=12))
        loss = LossOptions(exit_weights=[0.3, 0.7], kl_topk=topk, kl_samples=VOCAB, kl_tail_samples=tail_samples,
                           chunk_tokens=7)
        stats = distill(model, out, None, loss, normalizer=24.0)
        kls.append(stats.kl)
        grads.append(torch.cat([p.grad.flatten() for p in model.balconies.parameters() if p.grad is not None]))
    assert kls[1] == pytest.approx(kls[0], rel=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_a_sampled_remainder_makes_the_sparse_kl_the_exact_one_in_expectation():
    """Top 4 of the vocabulary: one bucket for the rest misses the within-tail KL; drawing the rest
    from the teacher recovers it, and its gradient, as the draws grow."""
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="random")
    found = {}
    for topk, tail in ((0, 0), (4, 0), (4, 4096)):
        model.zero_grad()
        out = model.forward_exits(ids(length=16))
        loss = LossOptions(exit_weights=[0.5, 0.5], kl_topk=topk, kl_samples=VOCAB, kl_tail_samples=tail)
        stats = distill(model, out, None, loss, normalizer=32.0)
        found[topk, tail] = stats.kl[2], torch.cat([p.grad.flatten() for p in model.balconies.parameters()
                                                    if p.grad is not None])
    exact, coarse, sampled = found[0, 0], found[4, 0], found[4, 4096]
    assert coarse[0] < 0.95 * exact[0] and sampled[0] == pytest.approx(exact[0], rel=0.02)
    cos = torch.nn.functional.cosine_similarity
    assert cos(sampled[1], exact[1], dim=0) > 0.99 > cos(coarse[1], exact[1], dim=0)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_the_top1_term_is_the_cross_entropy_against_the_teachers_argmax(ce_weight):
    """Exact path: the gradient of KL + top1_weight * CE(argmax of the teacher) (+ the data CE) by
    autograd; sparse path over the whole vocabulary: the same gradient."""
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="random")
    x = ids(length=12)
    labels = torch.full_like(x, -100)
    labels[:, :-1] = x[:, 1:]
    weights, n, w1 = {2: 0.3, 4: 0.7}, 24.0, 0.8
    out = model.forward_exits(x, return_logits=True)
    logp_t = torch.log_softmax(out.teacher_logits.float(), -1)
    reference = 0.0
    for e, w in weights.items():
        logp_s = torch.log_softmax(out.logits[e].float(), -1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum()
        top1 = -logp_s.gather(-1, logp_t.argmax(-1, keepdim=True)).sum()
        ce = -logp_s.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[labels >= 0].sum()
        reference = reference + w * (kl + w1 * top1 + ce_weight * ce) / n
    reference.backward()
    expected = torch.cat([p.grad.flatten() for p in model.balconies.parameters() if p.grad is not None])
    for topk in (0, VOCAB - 1):
        if topk and ce_weight:
            continue  # the sparse KL has no data CE
        model.zero_grad()
        out = model.forward_exits(x)
        loss = LossOptions(exit_weights=list(weights.values()), ce_weight=ce_weight, chunk_tokens=7, top1_weight=w1,
                           kl_topk=topk, kl_samples=VOCAB, kl_tail_samples=0)
        stats = distill(model, out, None, loss, normalizer=n, labels=labels)
        found = torch.cat([p.grad.flatten() for p in model.balconies.parameters() if p.grad is not None])
        torch.testing.assert_close(found, expected, atol=1e-6, rtol=1e-4, msg=f"topk {topk}")
        assert stats.kl[2] == pytest.approx(kl_of(model, x).kl[2], rel=1e-4)  # the KL statistic holds the KL alone


def test_recall_positions_mark_a_less_common_token_seen_before_in_its_row():
    common = torch.zeros(10, dtype=torch.bool)
    common[1] = True  # say token 1 is "the"
    x = torch.tensor([[5, 1, 7, 1, 5, 2, 7, 5], [2, 3, 4, 5, 6, 7, 8, 9]])
    found = recall_positions(x, common)
    # row 0: position 3 predicts 5 (seen at 0), position 5 predicts 7 (seen at 2), position 6
    # predicts 5; position 2 predicts 1, seen before but common; the last position predicts nothing
    assert found.tolist() == [[False, False, False, True, False, True, True, False], [False] * 8]
    counts = common_tokens(torch.tensor([[3, 3, 3, 4, 4, 5]]), 8, n=2)
    assert counts.tolist() == [False, False, False, True, True, False, False, False]


@pytest.mark.parametrize("topk", [0, VOCAB - 1])
def test_the_recall_weight_weighs_each_recall_tokens_loss(topk):
    """The gradient of sum_tokens (1 + w * recall) * KL, by autograd, for the exact and the sparse KL."""
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="random")
    x = ids(length=12)
    recall = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    weights, n, w = {2: 0.5, 4: 0.5}, 24.0, 3.0
    out = model.forward_exits(x, return_logits=True)
    logp_t = torch.log_softmax(out.teacher_logits.float(), -1)
    reference = 0.0
    for e, we in weights.items():
        kl = (logp_t.exp() * (logp_t - torch.log_softmax(out.logits[e].float(), -1))).sum(-1)
        reference = reference + we * ((1 + w * recall) * kl).sum() / n
    reference.backward()
    expected = torch.cat([p.grad.flatten() for p in model.balconies.parameters() if p.grad is not None])
    model.zero_grad()
    loss = LossOptions(exit_weights=list(weights.values()), chunk_tokens=7, kl_topk=topk, kl_samples=VOCAB,
                       kl_tail_samples=0, recall_weight=w)
    stats = distill(model, model.forward_exits(x), None, loss, normalizer=n, recall=recall)
    found = torch.cat([p.grad.flatten() for p in model.balconies.parameters() if p.grad is not None])
    torch.testing.assert_close(found, expected, atol=1e-6, rtol=1e-4)
    assert stats.kl[2] == pytest.approx(kl_of(model, x).kl[2], rel=1e-4)  # the statistic is the plain KL
    # validation counts agreement at the recall positions
    val = distill(model, model.forward_exits(x), None, loss, normalizer=1.0, backward=False, recall=recall)
    assert val.recall_tokens == recall.sum() and 0 <= val.recall_agree[2] <= val.recall_tokens
    assert "recall_agreement/2" in val.means()


def test_sparse_kl_follows_the_exact_gradient():
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="random")
    grads = []
    for topk, samples in ((0, 0), (16, 32)):
        model.zero_grad()
        out = model.forward_exits(ids(length=16))
        distill(model, out, None, LossOptions(kl_topk=topk, kl_samples=samples, kl_tail_samples=0), normalizer=32.0)
        grads.append(torch.cat([p.grad.flatten() for p in model.balconies.parameters() if p.grad is not None]))
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.9


@pytest.mark.parametrize("kl_topk", [0, 8])
def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, kl_topk):
    data = corpus_data(tmp_path)
    straight = make_trainer(tmp_path / "a", data, max_steps=8, grad_accum=2, kl_topk=kl_topk, kl_samples=16).fit()
    interrupted = make_trainer(tmp_path / "b", data, max_steps=8, grad_accum=2, keep_checkpoints=1, kl_topk=kl_topk,
                               kl_samples=16)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        interrupted.fit(stop_when=lambda trainer: trainer.step >= 3)
    checkpoints = list((tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000003"]
    with pytest.raises(Exception, match="--resume"):
        make_trainer(tmp_path / "b", data, max_steps=8, grad_accum=2).fit()
    resumed = make_trainer(tmp_path / "b", data, max_steps=8, grad_accum=2, resume=True, kl_topk=kl_topk,
                           kl_samples=16)
    assert resumed.step == 0
    resumed = resumed.fit()
    for (k, a), (_, b) in zip(straight.balconies.state_dict().items(), resumed.balconies.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


# trainer_state.json as balcony wrote it before checkpoints carried a format number: these keys only
OLD_STATE_KEYS = ["step", "total_steps", "exits", "data_fingerprint", "tokens_per_step", "seed", "param_groups",
                  "scheduler", "rng_python"]


def test_a_checkpoint_in_the_earlier_layout_resumes_and_a_later_format_is_refused(tmp_path):
    data = corpus_data(tmp_path)
    straight = make_trainer(tmp_path / "a", data, max_steps=6).fit()
    with pytest.raises(TrainingInterrupted):
        make_trainer(tmp_path / "b", data, max_steps=6).fit(stop_when=lambda trainer: trainer.step >= 2)
    (checkpoint,) = (tmp_path / "b" / "run" / "checkpoints").iterdir()
    assert {p.name for p in checkpoint.iterdir()} == {"balcony_config.json", "balcony_model.safetensors",
                                                       "optimizer.safetensors", "trainer_state.json"}
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: state[k] for k in OLD_STATE_KEYS}) + "\n")
    resumed = make_trainer(tmp_path / "b", data, max_steps=6, resume=True).fit()
    for (k, a), (_, b) in zip(straight.balconies.state_dict().items(), resumed.balconies.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)

    state_file.write_text(json.dumps({**state, "format": 99}) + "\n")
    with pytest.raises(Exception, match="format 99.*start a new --out"):
        make_trainer(tmp_path / "b", data, max_steps=6, resume=True).fit()
    state_file.write_text(json.dumps({k: state[k] for k in OLD_STATE_KEYS if k != "rng_python"}) + "\n")
    with pytest.raises(Exception, match="lacks rng_python"):
        make_trainer(tmp_path / "b", data, max_steps=6, resume=True).fit()


def test_resume_refuses_a_different_run(tmp_path):
    data = corpus_data(tmp_path)
    with pytest.raises(TrainingInterrupted):
        make_trainer(tmp_path, data, max_steps=6).fit(stop_when=lambda trainer: trainer.step >= 2)
    with pytest.raises(Exception, match="different run"):
        make_trainer(tmp_path, data, max_steps=6, batch_size=2, resume=True).fit()


def test_checkpoints_are_rotated_and_hold_no_pickle(tmp_path):
    data = corpus_data(tmp_path)
    make_trainer(tmp_path, data, max_steps=7, checkpoint_every=2, keep_checkpoints=2).fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]
    files = {p.name for p in (root / "step-00000006").iterdir()}
    assert files == {"balcony_config.json", "balcony_model.safetensors", "optimizer.safetensors", "trainer_state.json"}


def test_bad_options_fail_before_any_work(tmp_path):
    data = corpus_data(tmp_path)
    with pytest.raises(Exception, match="exit weights"):
        make_trainer(tmp_path, data, exit_weights=[1.0])
    with pytest.raises(Exception, match="global batch"):
        make_trainer(tmp_path, PackedData(train=data.train[:2], val=data.val, source="x"), batch_size=4)
    with pytest.raises(Exception, match="precision"):
        make_trainer(tmp_path, data, precision="fp8")
    with pytest.raises(Exception, match="kl_topk"):
        make_trainer(tmp_path, data, kl_topk=-1)
    with pytest.raises(Exception, match="cross-entropy"):
        make_trainer(tmp_path, data, kl_topk=8, ce_weight=0.5)
    with pytest.raises(Exception, match="top1_weight"):
        make_trainer(tmp_path, data, top1_weight=-1.0)
    with pytest.raises(Exception, match="recall_weight"):
        make_trainer(tmp_path, data, recall_weight=-1.0)


def test_bf16_activation_checkpointing_and_sparse_kl_train(tmp_path):
    data = corpus_data(tmp_path)
    trainer = make_trainer(tmp_path, data, max_steps=3, precision="bf16", activation_checkpointing=True, kl_topk=8,
                           kl_samples=16, recall_weight=2.0)
    trainer.fit()
    assert (tmp_path / "run" / "balcony_model.safetensors").is_file()


@pytest.mark.parametrize("tail_samples", [0, 4])
def test_a_cached_teacher_trains_exactly_as_the_live_one_and_later_epochs_skip_the_top_of_the_trunk(tmp_path,
                                                                                                   tail_samples):
    full = corpus_data(tmp_path)
    data = PackedData(train=full.train[:16], val=full.val[:4], source="x")
    options = dict(kl_topk=8, kl_samples=16, kl_tail_samples=tail_samples, batch_size=4)
    steps = 9  # two epochs of four steps and one into the third
    live = make_trainer(tmp_path / "live", data, max_steps=steps, **options).fit()
    cached = make_trainer(tmp_path / "cached", data, max_steps=steps, teacher_cache=str(tmp_path / "cache"), **options)
    cached.fit()
    for (k, a), (_, b) in zip(live.balconies.state_dict().items(), cached.model.balconies.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    assert cached.teacher_cache.filled == 16

    top_layer = cached.model.parts.layers[-1]
    calls = []
    handle = top_layer.register_forward_hook(lambda *args: calls.append(1))
    cached.train_step()
    handle.remove()
    assert calls == []  # a cached row runs the trunk only up to the deepest exit

    # the next run on the same data and base reads the same folder; other data gets its own
    again = make_trainer(tmp_path / "again", data, max_steps=1, teacher_cache=str(tmp_path / "cache"), **options)
    assert again.teacher_cache.dir == cached.teacher_cache.dir and again.teacher_cache.filled == cached.teacher_cache.filled
    other = PackedData(train=data.train.flip(0), val=data.val, source="x")
    assert make_trainer(tmp_path / "o", other, teacher_cache=str(tmp_path / "cache"), **options).teacher_cache.filled == 0


def test_a_torn_teacher_cache_is_rebuilt_and_one_without_the_sparse_kl_refused(tmp_path):
    data = corpus_data(tmp_path)
    cache = make_trainer(tmp_path, data, kl_topk=8, kl_samples=16, teacher_cache=str(tmp_path / "cache")).teacher_cache
    (cache.dir / "logp.npy").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="afresh"):
        rebuilt = make_trainer(tmp_path, data, kl_topk=8, kl_samples=16, teacher_cache=str(tmp_path / "cache"))
    assert rebuilt.teacher_cache.filled == 0
    with pytest.raises(Exception, match="--kl-topk"):
        make_trainer(tmp_path, data, teacher_cache=str(tmp_path / "cache"))


def test_loggers_write_jsonl_and_name_tensorboard_scalars_by_split(tmp_path, monkeypatch):
    import sys
    import types

    from balcony.training.loggers import open_loggers

    scalars = []
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = lambda folder: types.SimpleNamespace(add_scalar=lambda *a: scalars.append(a), close=lambda: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    logger = open_loggers(tmp_path, "tensorboard", {})
    logger.log(3, "val", {"kl/2": 0.5})
    logger.close()
    assert scalars == [("val/kl/2", 0.5, 3)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "split": "val", "kl/2": 0.5}
    assert open_loggers(tmp_path / "other", "tensorboard", {}, main=False).loggers == []
    with pytest.raises(Exception, match="--report-to"):
        open_loggers(tmp_path, "nothing", {})
