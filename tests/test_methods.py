"""The trained baselines beside balcony (`--method layerskip`, `--method pruned`): each trains, resumes
exactly and loads; what each changes of the full model; LayerSkip's gradient, head included."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    NUM_LAYERS,
    VOCAB,
    tiny_base,
    tiny_config,
    tiny_tokenizer,
    write_corpus,
)
from transformers import AutoModelForCausalLM

from balcony import BalconyModel
from balcony.core.errors import BalconyError
from balcony.export import export
from balcony.training.config import METHODS, LossOptions, TrainConfig
from balcony.training.data import build_dataset
from balcony.training.distill import distill
from balcony.training.layerskip import LayerSkipModel
from balcony.training.methods import trained
from balcony.training.trainer import Trainer, TrainingInterrupted

IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _no_learning_curves(monkeypatch):
    # the plot at the end of every fit is tested elsewhere: here it would be most of the time
    monkeypatch.setattr("balcony.training.trainer.plot_learning_curve", lambda *args: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=40)
    return build_dataset(str(path), tiny_tokenizer(), 16, val_fraction=0.1)


def fresh(method: str):
    if method == "layerskip":
        return LayerSkipModel(tiny_base("llama"), [2, 4], layer_dropout=0.3, tokenizer=tiny_tokenizer())
    return BalconyModel.from_base(tiny_base("llama"), exits=[2, 4], init="next" if method == "pruned" else "copy",
                                  tokenizer=tiny_tokenizer())


def trainer(out, data, method: str, **options) -> Trainer:
    # the sparse KL with its sampled remainder, and (layerskip) layer dropout: every draw a resume must repeat
    options = dict(out=str(out), method=method, seq_len=16, batch_size=4, lr=3e-3, eval_every=1000, val_sequences=8,
                   checkpoint_every=1000, progress=False, max_steps=4, kl_topk=8, kl_samples=16, kl_tail_samples=2,
                   **options)
    config = TrainConfig.from_flat(**options)
    return Trainer(config, model=fresh(method), data=data)


def weights(model) -> dict:
    return trained(model).trainable.state_dict()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_resumes_exactly_and_loads_as_what_it_is(tmp_path, data, method):
    straight = trainer(tmp_path / "a", data, method).fit()
    with pytest.raises(TrainingInterrupted):
        trainer(tmp_path / "b", data, method).fit(stop_when=lambda t: t.step >= 2)
    resumed = trainer(tmp_path / "b", data, method, resume=True).fit()
    for key, value in weights(straight).items():
        torch.testing.assert_close(value, weights(resumed)[key], atol=1e-6, rtol=0, msg=key)

    original = tiny_base("llama")(IDS).logits
    if method == "layerskip":
        loaded = LayerSkipModel.from_pretrained(tmp_path / "a", base=tiny_base("llama"))
        assert loaded.exits == [2, 4] and loaded.layerskip_config.layer_dropout == 0.3
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a")  # the artifact is a whole model
        torch.testing.assert_close(plain(IDS).logits, straight.student(IDS).logits)
        # its full model changed; the original beside it did not
        assert (loaded.student(IDS).logits - original).abs().max() > 1e-3
        torch.testing.assert_close(loaded.base(IDS).logits, original, atol=0, rtol=0)
    else:
        loaded = BalconyModel.from_pretrained(tmp_path / "a", base=tiny_base("llama"))
        torch.testing.assert_close(loaded(IDS, exit_layer=2).logits, straight(IDS, exit_layer=2).logits)
        torch.testing.assert_close(loaded(IDS, exit_layer=None).logits, original, atol=0, rtol=0)  # untouched


def test_pruned_is_the_truncated_stack_healed_and_exports_e_plus_one_layers(tmp_path, data):
    # fresh, pruned at exit e *is* the first e + 1 base layers, the final norm and the head
    model = fresh("pruned")
    assert model.balcony_config.init == "next" and model.balcony_config.sources(2) == [2]
    out = model.forward_exits(IDS, baselines=True)
    torch.testing.assert_close(out.hidden[2], out.truncation[2])
    trainer(tmp_path / "run", data, "pruned").fit()
    healed = BalconyModel.from_pretrained(tmp_path / "run", base=tiny_base("llama"))
    for e in healed.exits:
        export(healed, e, tmp_path / f"exit{e}")
        standalone = AutoModelForCausalLM.from_pretrained(tmp_path / f"exit{e}")
        assert standalone.config.num_hidden_layers == e + 1 and len(standalone.model.layers) == e + 1
        torch.testing.assert_close(standalone(IDS).logits, healed(IDS, exit_layer=e).logits)


def _tied_base() -> torch.nn.Module:
    """A tiny Llama whose head is its embedding, as SmolLM2's is: a trained head is one parameter used twice."""
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0) if p.dim() >= 2 else None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


def test_layerskip_gradient_of_every_parameter_equals_autograd():
    model = LayerSkipModel(_tied_base(), [2, 4], layer_dropout=0.0)
    student = model.student
    keys = [2, 4, NUM_LAYERS]
    model.train()
    out = model.forward_exits(IDS)
    p_t = torch.log_softmax(model.base(IDS).logits.float(), -1)
    reference = sum((p_t.exp() * (p_t - torch.log_softmax(student.lm_head(out.hidden[e]), -1))).sum() for e in keys)
    (reference / len(keys) / IDS.numel()).backward()
    expected = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    head = model.student_parts.head
    distill(model, model.forward_exits(IDS), None, LossOptions(chunk_tokens=7), normalizer=float(IDS.numel()),
            student_head=head)
    for k, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], atol=1e-6, rtol=1e-4, msg=k)
    assert all(p.grad is None for p in model.base.parameters())
    # the sparse KL, its head rows gathered and their gradients scattered back: where it reads
    # (nearly) the whole vocabulary, it is (nearly) the exact gradient
    student.zero_grad()
    distill(model, model.forward_exits(IDS), None, LossOptions(kl_topk=80, kl_samples=VOCAB, kl_tail_samples=0),
            normalizer=float(IDS.numel()), student_head=head)
    sparse = torch.cat([p.grad.flatten() for p in student.parameters()])
    dense = torch.cat([expected[k].flatten() for k, _ in student.named_parameters()])
    assert torch.nn.functional.cosine_similarity(sparse, dense, dim=0) > 0.999


def test_layer_dropout_grows_with_depth_and_is_a_function_of_the_seed():
    model = LayerSkipModel(tiny_base("llama"), [2], layer_dropout=0.5)
    masks = torch.stack(model.keep_masks(4000, seed=3))  # [layers, rows]
    dropped = 1 - masks.float().mean(1)
    expected = 0.5 * torch.arange(NUM_LAYERS) / (NUM_LAYERS - 1)
    assert dropped[0] == 0 and torch.allclose(dropped, expected, atol=0.03)
    assert torch.equal(masks, torch.stack(model.keep_masks(4000, seed=3)))
    model.train()
    a, b = (model.forward_exits(IDS, dropout_seed=s).hidden[NUM_LAYERS] for s in (0, 0))
    torch.testing.assert_close(a, b)
    model.eval()  # evaluation never drops a layer: the student's full model is its plain forward
    torch.testing.assert_close(model.forward_exits(IDS, dropout_seed=0).hidden[NUM_LAYERS],
                               model.student.model(IDS).last_hidden_state)


@pytest.mark.parametrize("options, message", [
    ({"method": "distil"}, "unknown method"),
    ({"method": "pruned", "init": "random"}, "init next"),
    ({"method": "pruned", "init_from": "default"}, "--init-from"),
    ({"method": "layerskip", "fsdp": True}, "--fsdp"),
    ({"method": "layerskip", "layer_dropout": 1.0}, "layer_dropout"),
    ({"method": "layerskip", "recall_weight": 1.0}, "--recall-weight"),
])
def test_method_options_are_refused_before_any_work(options, message):
    with pytest.raises(BalconyError, match=message):
        TrainConfig.from_flat(out="x", **options).check()
    assert TrainConfig.from_flat(out="x", method="pruned").init == "next"
