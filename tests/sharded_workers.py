"""Process bodies for the sharded-training tests (run by ``lightning_sr.testing.spawn_gloo``).

The online merging optimizers are driven with the same gradients whatever the layout: each step's
gradient of each parameter is drawn whole from a seeded generator and every rank takes its shard
of it, so one process and any number of FSDP2 shards must end with bit-identical weights.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lightning_sr import optim
from lightning_sr.optim.shards import flat_shard, is_sharded, local
from lightning_sr.testing import tiny_llama

# Uneven shards on 4 ranks: 70 vocabulary rows, 66 MLP units.
MODEL = {"vocab_size": 70, "hidden_size": 40, "intermediate_size": 66, "num_attention_heads": 4, "num_key_value_heads": 2}


def sft_model_and_base(seed: int = 0):
    """A tiny Llama (the SFT model) and a base it differs from by a random τ."""
    model = tiny_llama(seed=seed, **MODEL).train()
    generator = torch.Generator().manual_seed(seed + 100)
    base = {n: p.detach() - 0.01 * torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}
    return model, base


def gradient(name: str, shape, step: int, ties: bool) -> torch.Tensor:
    """The whole gradient of parameter ``name`` at ``step``: the same in every process."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}:{step}".encode()))
    if ties:  # a few distinct values: Adam's |m̂|/√v̂ ties all over the parameter
        return torch.randint(-2, 3, shape, generator=generator).float()
    return torch.randn(shape, generator=generator)


def set_gradients(model: torch.nn.Module, step: int, ties: bool) -> None:
    for name, param in model.named_parameters():
        grad = gradient(name, param.shape, step, ties)
        if is_sharded(param):
            shard = flat_shard(param)
            part = grad.reshape(-1)[shard.start : shard.start + local(param).numel()].view(local(param).shape)
            grad = DTensor.from_local(part, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
        param.grad = grad


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if is_sharded(p) else p).detach().clone() for n, p in model.named_parameters()}


def build(optimizer: dict, processes: int | None):
    """The SFT model (sharded over ``processes`` gloo ranks, or whole for None), its optimizer
    with the base set."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_sr.sharding import shard_model

    model, base = sft_model_and_base()
    if processes is not None:
        shard_model(model, init_device_mesh("cpu", (processes,)))
    opt = getattr(optim, optimizer["class"])(model.parameters(), **optimizer["init_args"])
    opt.set_base(model, base)
    return model, opt


def train(model, opt, steps: range, ties: bool) -> None:
    for step in steps:
        set_gradients(model, step, ties)
        opt.step()
        opt.zero_grad()


def run_optimizers(rank: int, processes: int, optimizers: list[dict], steps: int, out: str) -> None:
    """Train each optimizer config for ``steps`` steps on the sharded model; rank 0 saves the full
    weights of each, and every rank reports the bytes of its τ̃."""
    results = {}
    for i, optimizer in enumerate(optimizers):
        model, opt = build(optimizer, processes)
        train(model, opt, range(steps), optimizer.get("ties", False))
        weights = full_weights(model)
        tau_bytes = torch.tensor([opt.reference_bytes()])
        gathered = [torch.zeros_like(tau_bytes) for _ in range(processes)]
        dist.all_gather(gathered, tau_bytes)
        results[i] = {"weights": weights, "tau_bytes": [int(t) for t in gathered]}
    if rank == 0:
        torch.save(results, out)


def run_checkpointed(rank: int, processes: int, optimizers: list[dict], steps: range, load: str | None, save: str | None, out: str) -> None:
    """For each optimizer config: resume from the distributed checkpoint ``{load}/{i}`` (if given),
    train ``steps``, save a distributed checkpoint to ``{save}/{i}`` (if given); rank 0 saves the
    full weights of each to ``out``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    results = {}
    for i, optimizer in enumerate(optimizers):
        model, opt = build(optimizer, processes)
        if load:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=f"{load}/{i}")
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        train(model, opt, steps, optimizer.get("ties", False))
        if save:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=f"{save}/{i}")
        results[i] = full_weights(model)
    if rank == 0:
        torch.save(results, out)
