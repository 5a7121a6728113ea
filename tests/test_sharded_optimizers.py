"""OnDARE, OnTIES and step-K on FSDP2 (DTensor) parameters: the same weights for any layout.

Each run drives the optimizers with the same whole gradients (every rank takes its shard), so
any difference between one process and 2 or 4 shards is the optimizers' own: masks drawn per
shard, a top-k of each shard instead of each parameter, or state that does not survive a
distributed checkpoint. Shards are uneven on 4 ranks.
"""

import pytest
import torch

from lightning_sr.testing import spawn_gloo
from sharded_workers import build, full_weights, run_checkpointed, run_optimizers, train

pytestmark = pytest.mark.slow

STEPS = 8
OPTIMIZERS = [
    {"class": "OnDARE", "init_args": {"lr": 1e-2, "keep_rate": 0.3, "merge_weight": 0.2, "seed": 3}},
    {"class": "OnTIES", "init_args": {"lr": 1e-2, "keep_rate": 0.3, "merge_weight": 0.2}},
    {"class": "OnTIES", "init_args": {"lr": 1e-2, "keep_rate": 0.3, "merge_weight": 0.2}, "ties": True},
    {"class": "OnDARE", "init_args": {"lr": 1e-2, "keep_rate": 0.3, "merge_weight": 0.2, "merge_every": 3}},
    {"class": "OnTIES", "init_args": {"lr": 1e-2, "keep_rate": 0.3, "merge_weight": 0.2, "merge_every": 3, "weight_decay": 0.1}},
]
IDS = ["ondare", "onties", "onties_ties", "ondare_step3", "onties_step3_wd"]


@pytest.fixture(scope="module")
def one_process():
    """Full weights after STEPS steps of each optimizer on the unsharded model."""
    results = []
    for optimizer in OPTIMIZERS:
        model, opt = build(optimizer, None)
        train(model, opt, range(STEPS), optimizer.get("ties", False))
        results.append((full_weights(model), opt.reference_bytes()))
    return results


@pytest.mark.parametrize("processes", [2, 4])
def test_sharded_optimizers_end_bit_exactly_where_one_process_ends(processes, one_process, tmp_path):
    out = tmp_path / "weights.pt"
    spawn_gloo(run_optimizers, processes, OPTIMIZERS, STEPS, str(out))
    sharded = torch.load(out)
    for i, name in enumerate(IDS):
        expected, tau_bytes = one_process[i]
        got = sharded[i]["weights"]
        moved = sum(int((w != build(OPTIMIZERS[i], None)[0].state_dict()[n]).sum()) for n, w in expected.items())
        assert moved > 0, name
        for param, weight in expected.items():
            assert torch.equal(got[param], weight), f"{name}: {param} differs on {processes} shards"
        # Each rank stores only its shard's part of τ̃: together the one-process τ̃, none of it twice.
        assert sum(sharded[i]["tau_bytes"]) == tau_bytes, name
        assert max(sharded[i]["tau_bytes"]) < 0.6 * tau_bytes * 2 / processes, name


def test_distributed_checkpoint_resumes_bit_exactly_on_the_same_or_another_number_of_ranks(one_process, tmp_path):
    """Saved by torch's distributed checkpoint after 4 of 8 steps on 2 ranks (moments, τ̃, mask
    generator, step-K buffer), resumed on 2, 4 and 1 ranks."""
    chosen = [0, 4]  # OnDARE (the mask generator), OnTIES step-3 with weight decay (the step-K buffer)
    optimizers = [OPTIMIZERS[i] for i in chosen]
    checkpoint = str(tmp_path / "step4")
    spawn_gloo(run_checkpointed, 2, optimizers, range(4), None, checkpoint, str(tmp_path / "first.pt"))
    for processes in (2, 4, 1):
        out = tmp_path / f"resumed{processes}.pt"
        spawn_gloo(run_checkpointed, processes, optimizers, range(4, STEPS), checkpoint, None, str(out))
        resumed = torch.load(out)
        for j, i in enumerate(chosen):
            for param, weight in one_process[i][0].items():
                assert torch.equal(resumed[j][param], weight), f"{IDS[i]}: {param} differs after resuming on {processes} ranks"
