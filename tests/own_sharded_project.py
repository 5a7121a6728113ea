"""A user's own sharded project: a LightningModule that applies ``fully_shard`` itself, trained
with OnTIES and the ``OnlineMerging`` callback (run by ``tests/test_sharded_training.py``).

    python tests/own_sharded_project.py BASE_FOLDER OUT_FILE PROCESSES

With PROCESSES > 1 it runs under ``lightning_sr.FSDP2Strategy`` on CPUs (Lightning starts the
other processes by running this script again); with 1 it runs unsharded. Rank 0 saves the full
trained weights to OUT_FILE.
"""

import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_sr.callbacks import OnlineMerging
from lightning_sr.optim import OnTIES
from lightning_sr.optim.shards import is_sharded
from lightning_sr.testing import make_tokenizer, tiny_llama

VOCAB = len(make_tokenizer())
GLOBAL_BATCH = 4


class OwnModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        # The SFT model (the base is another seed), in float64: OnTIES' top-k and sign election
        # turn the last bits of a gradient averaged in another order into whole steps, which in
        # float32 hides whether the sharded run is right.
        self.net = tiny_llama(seed=1).double().train()

    def configure_model(self):
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or is_sharded(next(self.net.parameters())):
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.net.model.layers:
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self.net, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        # The same global batch of GLOBAL_BATCH rows every step, split over the processes.
        g = torch.Generator().manual_seed(self.global_step)
        tokens = torch.randint(4, VOCAB, (GLOBAL_BATCH, 8), generator=g)
        rows = GLOBAL_BATCH // self.trainer.world_size
        mine = tokens[self.global_rank * rows : (self.global_rank + 1) * rows]
        return self.net(input_ids=mine, labels=mine).loss

    def configure_optimizers(self):
        return OnTIES(self.parameters(), lr=1e-2, keep_rate=0.3, merge_weight=0.1)

    def train_dataloader(self):
        return DataLoader(list(range(16)), batch_size=1)


def main(base: str, out: str, processes: int) -> None:
    strategy = {}
    if processes > 1:
        from lightning_sr.sharding import FSDP2Strategy

        strategy = {"strategy": FSDP2Strategy()}
    trainer = pl.Trainer(accelerator="cpu", devices=processes, max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[OnlineMerging(base_model=base)], **strategy)
    module = OwnModule()
    trainer.fit(module)
    weights = {n: (p.full_tensor() if is_sharded(p) else p).detach().clone() for n, p in module.named_parameters()}
    if trainer.is_global_zero:
        torch.save(weights, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
