"""Shared fixtures: tiny models that make every test run in well under a second on a CPU."""

import pytest
import torch

from gptforge import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    args = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**args, **overrides})


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(1234)
    return GPT(tiny_config()).eval()
