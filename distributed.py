"""distributed.py: several processes on one node, torchrun + FSDP2. Without torchrun every function here is a
no-op (or the one-process call), so one process runs exactly as it would without this file.

nanoGPT style: torchrun's RANK variable switches it on (`init`), and everything after asks `rank()` and
`world_size()`:

    torchrun --nproc_per_node 8 at_sft.py ...      # 8 processes, the model sharded over them
    python at_sft.py ...                           # one process: nothing here does anything

Layout: each decoder layer is one FSDP2 unit and the top module the root (embeddings, vision encoder,
projector, final norm, LM head). A unit's parameters are all-gathered just before it runs and freed after, its
gradients reduce-scattered (averaged over ranks) in backward; each rank keeps 1/world of the weights, gradients
and AdamW states. FSDP2 shards per parameter, so frozen (vision) and trainable parameters share the root. The
vision encoder is not a unit of its own: HF's generate runs it outside the model's forward (to encode the video
once), and a unit run before the root would make FSDP2 fail.

The SafetyAlarm (2 vectors + 2 heads: a few thousand numbers) lives outside the HF model and is reached through
a hook and `classify`, not a module forward FSDP could wrap, so it stays whole on every rank and its gradients
are averaged with one all-reduce each (`all_reduce_alarm_grads`).

The functions take a model.VideoLLM (`llm`): they read its `.model` (the HF model) and `.alarm`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

BACKBONE = "vsr1_backbone"  # the method name shard_model registers with FSDP2 (see model.VideoLLM.base_forward)


# -----------------------------------------------------------------------------
# The process group


def init(device: str | None = None) -> tuple[int, int, int, str | None]:
    """Join the process group when launched by torchrun. Returns (rank, world, local_rank, device): this
    process's device (cuda:LOCAL_RANK with nccl, or cpu with gloo); (0, 1, 0, `device`) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0, device
    local_rank = int(os.environ["LOCAL_RANK"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list) -> list:
    """Element-wise sum of a list of numbers over ranks (fp64); the list itself in one process."""
    if world_size() == 1:
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def union_over_ranks(d: dict) -> dict:
    """The union of each rank's dict (all_gather_object); `d` itself in one process."""
    if world_size() == 1:
        return d
    parts = [None] * world_size()
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


# -----------------------------------------------------------------------------
# Sharding the model (FSDP2)


def is_sharded(llm) -> bool:
    return isinstance(llm.model, FSDPModule)


def shard_model(llm, device: str) -> None:
    """Shard `llm` with FSDP2's fully_shard over all ranks (see the layout above) and move it to `device`.
    Call it once, after loading (on CPU) and before making the optimizer."""
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    inner = llm.model.model
    for layer in inner.language_model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # The root keeps its parameters gathered from forward to backward: VideoLLM.forward applies the LM head
    # after the backbone, outside any module forward FSDP sees.
    fully_shard(llm.model, mesh=mesh, reshard_after_forward=False)
    # VideoLLM.base_forward calls the model without its LM head (llm.model.model), which is not the root's
    # forward: register that call as a forward method of the root so FSDP gathers the root's parameters for it.
    setattr(llm.model, BACKBONE, inner.__call__)
    register_fsdp_forward_method(llm.model, BACKBONE)
    if llm.alarm is not None:
        llm.alarm.to(device)


def _fsdp_units(llm) -> list:
    return [m for m in llm.model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(llm):
    """Inside, every rank holds all the weights and no forward runs a collective, so ranks may generate
    sequences of different lengths (a sharded forward per token would deadlock). Costs the full model's memory
    on each device. A no-op in one process."""
    if not is_sharded(llm):
        yield
        return
    units = _fsdp_units(llm)
    for unit in units:  # all-gathers, in the same order on every rank
        unit.unshard()
    llm.model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:  # frees the gathered copies; no communication
            unit.reshard()
            unit.set_reshard_after_forward(unit is not llm.model, recurse=False)  # as shard_model set them


def gathered(llm) -> bool:
    """Are the decoder layers' full weights in place (inside `unsharded`)? They are DTensor shards otherwise."""
    return not isinstance(next(llm.model.model.language_model.layers[0].parameters()), DTensor)


def check_gathered(llm, what: str) -> None:
    """Generation runs a forward per token, on each rank alone: a sharded model must be gathered first."""
    if is_sharded(llm) and not gathered(llm):
        raise RuntimeError(f"{what} on an FSDP2-sharded model: call it inside `with distributed.unsharded(llm):`")


# -----------------------------------------------------------------------------
# Gradients


def all_reduce_alarm_grads(llm) -> None:
    """Average the replicated SafetyAlarm's gradients over ranks, as FSDP does for the sharded weights."""
    if world_size() == 1 or llm.alarm is None:
        return
    for p in llm.alarm.parameters():
        if p.requires_grad:
            if p.grad is None:  # this rank's micro-batches were all skipped: it contributes zeros
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also over a mix of FSDP2-sharded (DTensor) and replicated parameters,
    which torch's own cannot stack: ‖g‖ = sqrt(‖g_sharded‖² + ‖g_replicated‖²), the sharded part's norm
    taken over all ranks' shards. Returns the total norm before clipping."""
    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not isinstance(p, DTensor)]
    norm_sharded = torch.nn.utils.get_total_norm([p.grad for p in sharded if p.grad is not None]).full_tensor()
    norm_plain = torch.nn.utils.get_total_norm([p.grad for p in plain if p.grad is not None]).to(norm_sharded.device)
    total = torch.sqrt(norm_sharded ** 2 + norm_plain ** 2)
    torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, total)
    torch.nn.utils.clip_grads_with_norm_(plain, max_norm, total)
    return total


# -----------------------------------------------------------------------------
# Full (unsharded) states for checkpoints, in one-process format


def full_state_dict(llm) -> dict:
    """The HF model's full weights as ordinary CPU tensors on rank 0 (an empty dict on the other ranks).
    A collective: every rank must call it."""
    return get_model_state_dict(llm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _with_alarm(llm) -> torch.nn.Module:
    """One module holding the HF model and the alarm, so every optimizer parameter has a name."""
    return torch.nn.ModuleDict({"model": llm.model, **({"alarm": llm.alarm} if llm.alarm is not None else {})})


def _optimizer_names(llm, optimizer) -> list[str]:
    names = {id(p): n for n, p in _with_alarm(llm).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state_dict(llm, optimizer) -> dict:
    """The optimizer's full (unsharded) state on rank 0, keyed like a one-process `optimizer.state_dict()`
    (parameters numbered in param_groups order); {} on the other ranks. A collective."""
    full = get_optimizer_state_dict(_with_alarm(llm), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() != 0:
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(llm, optimizer))}
    return {"state": {index[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]}


def load_full_optimizer_state_dict(llm, optimizer, state: dict) -> None:
    """Load a full optimizer state (full_optimizer_state_dict's or a one-process run's) into a sharded
    optimizer: each rank keeps its shard."""
    names = _optimizer_names(llm, optimizer)
    full = {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(_with_alarm(llm), optimizer, full, options=StateDictOptions(full_state_dict=True))
