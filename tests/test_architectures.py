import pytest
import torch
from conftest import NUM_LAYERS, tiny_base
from transformers import BertConfig, BertLMHeadModel

from balcony import BalconyModel, UnsupportedArchitectureError
from balcony.core.architectures import resolve


def test_every_supported_architecture_resolves(arch):
    parts = resolve(tiny_base(arch))
    assert parts.num_layers == NUM_LAYERS
    assert parts.head.weight.shape[0] == 96


def test_unsupported_architecture_names_what_is_missing():
    torch.manual_seed(0)
    bert = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedArchitectureError, match="'bert'.*ARCHITECTURES"):
        BalconyModel.from_base(bert, exits=[1])


def test_every_entry_of_the_architecture_table_has_a_tiny_model_test():
    from conftest import ARCHS

    from balcony.core.architectures import ARCHITECTURES

    assert sorted(ARCHS) == sorted(ARCHITECTURES)
