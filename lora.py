"""lora.py: LoRA adapters on the language model's linear layers (opt-in `--lora`; peft, an optional package).

A departure from the paper, which fine-tunes the whole LLM: with `--lora` the LLM's weights stay frozen and only
low-rank adapters train,

    W' = W + (α / r) · B A          (A: r × in, B: out × r; B starts at 0, so W' = W at step 0)

on the projections named by --lora-targets inside the language model only (never the vision encoder, whose
blocks also have gate/up/down projections, and never the ATC heads, which live outside the HF model). The alarm
vectors and ATC heads train in full as each stage has them (model.set_trainable).

- `wrap` injects the adapters in place (peft.inject_adapter_in_model), so the model keeps its class and module
  paths: rollout.py, the alarm hook and save_pretrained see the same model, with `q_proj.base_layer` inside.
- `merged_state_dict` is what model.save_checkpoint writes: W + (α/r)·BA under the plain names, no lora keys, so a
  saved checkpoint (final or snapshot) loads with model.load_model or plain transformers, without peft.
- Resume: a snapshot holds that merged checkpoint plus the adapters (ADAPTER_FILE); `restore` re-wraps the
  loaded merged model, loads A and B and takes their product back out of the base (W = W' − (α/r)·BA), so the
  optimizer's moments meet the same A and B. The base comes back equal up to fp32 rounding, not bitwise.
- Not with FSDP (torchrun): `check` refuses in one line.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

R = 16  # adapter rank
ALPHA = 32  # scale α (the update is (α / r) · B A)
DROPOUT = 0.05  # dropout on the adapter's input
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the LLM's projections
ADAPTER_FILE = "lora_adapters.safetensors"  # in a resume snapshot only: A and B under the wrapped model's names
INSIDE = ".language_model."  # adapters go only on modules whose path contains this (the LLM's decoder)


class LoraError(RuntimeError):
    """--lora cannot run here (peft missing, several processes): one line for the user."""


def _peft():
    try:
        import peft
    except ImportError:
        raise LoraError("--lora needs the optional package peft: pip install peft") from None
    return peft


def check(enabled: bool, world_size: int) -> None:
    """Before any data or model is read: peft importable, one process."""
    if not enabled:
        return
    _peft()
    if world_size > 1:
        raise LoraError("--lora is not supported with torchrun / FSDP: run one process (one GPU), or drop --lora")


def target_regex(targets) -> str:
    """The module paths that get adapters: one of `targets` as the last name, inside the language model."""
    names = "|".join(re.escape(t) for t in targets)
    return rf".*{re.escape(INSIDE)}.*\.({names})"


def wrap(model: nn.Module, *, r: int = R, alpha: float = ALPHA, dropout: float = DROPOUT, targets=TARGETS) -> None:
    """Inject LoRA adapters (peft's initialisation: A Kaiming-uniform, B zero) into `model` in place."""
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(targets),
                             bias="none")
    peft.inject_adapter_in_model(config, model)
    if not lora_layers(model):
        raise LoraError(f"--lora-targets {','.join(targets)}: no such linear layer in the language model")
    for n, p in model.named_parameters():  # inject leaves the base trainable; set_trainable decides after
        p.requires_grad_(is_adapter(n))


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def lora_layers(model: nn.Module) -> dict:
    """{module path: peft LoRA layer} of a wrapped model ({} when none, or when peft is not installed)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_wrapped(model: nn.Module) -> bool:
    return any(is_adapter(n) for n, _ in model.named_parameters())


def _delta(layer) -> torch.Tensor:
    """(α / r) · B A of the layer's one adapter, in the base weight's shape and dtype."""
    (name,) = layer.active_adapters
    return layer.get_delta_weight(name).to(layer.get_base_layer().weight.dtype)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict:
    """The plain model's state dict: each wrapped layer's weight W + (α/r)·BA under its own name (".base_layer"
    dropped), no adapter tensors. Copies only the merged weights; the live model is left as it is."""
    layers = lora_layers(model)
    out = {}
    for name, t in model.state_dict().items():
        if is_adapter(name):
            continue
        plain = name.replace(".base_layer.", ".")
        owner = plain.rsplit(".", 1)[0]
        if name.endswith(".base_layer.weight") and owner in layers:
            t = t + _delta(layers[owner])
        out[plain] = t
    return out


def adapter_state_dict(model: nn.Module) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if is_adapter(n)}


def save_adapters(model: nn.Module, directory: str) -> None:
    from safetensors.torch import save_file

    save_file(adapter_state_dict(model), os.path.join(directory, ADAPTER_FILE))


@torch.no_grad()
def restore(model: nn.Module, directory: str) -> None:
    """Resume: `model` is the snapshot's merged checkpoint, already wrapped; load A and B from the snapshot and
    take (α/r)·BA back out of each base weight, so the model computes what it did when the snapshot was taken."""
    from safetensors.torch import load_file

    path = os.path.join(directory, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise LoraError(f"--resume --lora: {directory} has no {ADAPTER_FILE} (its run did not use --lora)")
    saved = load_file(path)
    params = dict(model.named_parameters())
    if set(saved) != {n for n in params if is_adapter(n)}:
        raise LoraError(f"--resume --lora: the adapters in {path} do not match --lora-r / --lora-targets")
    for n, t in saved.items():
        params[n].copy_(t)
    for layer in lora_layers(model).values():
        w = layer.get_base_layer().weight
        w.sub_(_delta(layer))
