"""Train the tiny model under DDP (gloo, CPU) or in one process and save the parameters.

Run as a script by ``test_mixin_ddp.py``: Lightning's DDP launcher starts the other ranks
by re-running this file. Arguments: ``DEVICES OUTPUT_DIR [OPTIMIZER]``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import TinyLM, tiny_llama, token_batches  # noqa: E402


class ShardedTinyLM(TinyLM):
    """Rank r reads samples r, r + world, ...: the one-process run sees them in pairs."""

    def __init__(self, data, batch_size, vlorp):
        super().__init__(tiny_llama(), vlorp)
        self.data, self.batch_size = data, batch_size

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def main() -> None:
    devices, output = int(sys.argv[1]), Path(sys.argv[2])
    optimizer = sys.argv[3] if len(sys.argv) > 3 else "projfactor"
    settings = dict(optimizer=optimizer, lr=1e-3, rank=4, granularity=4, update_proj_gap=2)
    # Global batch 2 per micro-batch: one sample on each of two ranks, or two in one process.
    module = ShardedTinyLM(token_batches(count=24), 2 // devices, settings)
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=3,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    rank = trainer.global_rank
    state = {name: p.detach().clone() for name, p in module.net.named_parameters()}
    torch.save({"params": state, "steps": trainer.global_step}, output / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
