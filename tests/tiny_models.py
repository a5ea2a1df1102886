"""Tiny real models and LightningModules shared by the Lightning integration tests."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from vlorp_lightning import VLoRPMixin

VOCAB = 128


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama (hidden 64), built in well under a second."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def token_batches(count: int = 32, length: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count, length), generator=generator)


def loader(data: torch.Tensor, batch_size: int = 1) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class TinyLM(VLoRPMixin, L.LightningModule):
    """A user's LightningModule: only ``training_step`` is written, the mixin adds the optimizer."""

    def __init__(self, net: torch.nn.Module, vlorp=None):
        super().__init__(vlorp=vlorp)
        self.net = net

    def training_step(self, batch, batch_idx):
        loss = self.net(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss
