"""alarm.py: the alarm tokens and the Alarm-Token-Classification (ATC) heads of VideoSafety-R1 (AT-SFT).

Two special tokens go into the prompt of a video LLM:

    <|visual_alarm|>   right after the last visual token of the video
    <|textual_alarm|>  at the end of the user query, just before the end-of-turn token

Their ordinary token embeddings are *replaced* by two learnable vectors (zero-initialised, as in the authors'
code) before the LLM runs, and one ATC head per modality, a `Linear(hidden, 1)`, reads the final-layer hidden
state at its alarm token and says whether the video / the text is harmful (label 1) or safe (label 0).
AT-SFT trains

    L = L_base + λ1·BCE(ATC_v, y_v) + λ2·BCE(ATC_t, y_t),   λ1 = λ2 = 0.1                      (at_sft_loss)

This file needs only torch (and safetensors to save): copy it next to your own code. For any HF model:

    alarm = add_alarm_tokens(model, tokenizer)     # adds the 2 tokens, attaches the embedding swap
    ...put VISUAL_ALARM / TEXTUAL_ALARM into your prompt text...
    out = model.model(**inputs)                    # the hook swaps in the learnable vectors
    logit_v, logit_t = alarm.classify(out.last_hidden_state, inputs["input_ids"])
    loss, parts = at_sft_loss(lm_loss, logit_v, logit_t, video_label, text_label)
    alarm.save(directory)                          # later: alarm = add_alarm_tokens(model, tokenizer)
                                                   #        alarm.load_state(directory)

The swap is a forward hook on the input-embedding module, so it works in training and in `generate` alike with
no change to the model's own code.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

VISUAL_ALARM = "<|visual_alarm|>"
TEXTUAL_ALARM = "<|textual_alarm|>"
ALARM_FILE = "alarm.safetensors"
LAMBDA_V = LAMBDA_T = 0.1  # λ1, λ2: weights of the video / text ATC losses (paper)


class SafetyAlarm(nn.Module):
    """Two learnable alarm vectors and the two ATC heads.

    vectors[0] replaces the embedding of <|visual_alarm|>, vectors[1] that of <|textual_alarm|>.
    """

    def __init__(self, hidden_size: int, visual_id: int, textual_id: int):
        super().__init__()
        self.visual_id, self.textual_id = int(visual_id), int(textual_id)
        self.visual_token, self.textual_token = VISUAL_ALARM, TEXTUAL_ALARM
        self.vectors = nn.Parameter(torch.zeros(2, hidden_size))  # official init: zeros
        self.head_v = nn.Linear(hidden_size, 1)  # ATC head, video
        self.head_t = nn.Linear(hidden_size, 1)  # ATC head, text
        self._hook = None

    # --- embedding swap, before the LLM runs -------------------------------
    def attach(self, embedding: nn.Module) -> None:
        """Register the hook that swaps alarm-token embeddings for the learnable vectors."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = embedding.register_forward_hook(self._swap)

    def _swap(self, module, inputs, embeds):
        ids = inputs[0]  # (B, T)
        vec = self.vectors.to(embeds.dtype)
        embeds = torch.where((ids == self.visual_id).unsqueeze(-1), vec[0], embeds)  # (B, T, H)
        embeds = torch.where((ids == self.textual_id).unsqueeze(-1), vec[1], embeds)
        return embeds

    # --- ATC heads, on the final-layer hidden state at the alarm positions --
    def positions(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) index of the (last) visual and textual alarm token in each row; error if absent."""
        out = []
        for tid, name in ((self.visual_id, VISUAL_ALARM), (self.textual_id, TEXTUAL_ALARM)):
            hit = input_ids == tid  # (B, T)
            if not bool(hit.any(dim=1).all()):
                raise ValueError(f"a row of the batch has no {name} token; build prompts with data.build_prompt")
            idx = torch.arange(input_ids.shape[1], device=input_ids.device)
            out.append((hit * idx).argmax(dim=1))  # last occurrence
        return out[0], out[1]

    def classify(self, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ATC logits (B,), (B,) from the last-layer hidden state (B, T, H) at the alarm positions."""
        pv, pt = self.positions(input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        hv = last_hidden[rows, pv].to(self.head_v.weight.dtype)  # (B, H)
        ht = last_hidden[rows, pt].to(self.head_t.weight.dtype)
        return self.head_v(hv).squeeze(-1), self.head_t(ht).squeeze(-1)

    # --- persistence -------------------------------------------------------
    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, ALARM_FILE), metadata={"hidden_size": str(self.vectors.shape[1])})

    def load_state(self, directory: str) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(os.path.join(directory, ALARM_FILE)))


def add_alarm_tokens(model: nn.Module, tokenizer) -> SafetyAlarm:
    """Add the two alarm tokens to `tokenizer` (ids resolved here, never hard-coded), grow the
    embedding table if it has no spare rows, and attach a fresh SafetyAlarm to `model`."""
    tokenizer.add_special_tokens({"additional_special_tokens": [VISUAL_ALARM, TEXTUAL_ALARM]},
                                 replace_extra_special_tokens=False)
    vid, tid = tokenizer.convert_tokens_to_ids(VISUAL_ALARM), tokenizer.convert_tokens_to_ids(TEXTUAL_ALARM)
    emb = model.get_input_embeddings()
    if max(vid, tid) >= emb.num_embeddings:  # Qwen checkpoints usually have spare rows
        model.resize_token_embeddings(max(vid, tid) + 1)
        emb = model.get_input_embeddings()
    alarm = SafetyAlarm(emb.embedding_dim, vid, tid).to(device=emb.weight.device)
    alarm.attach(emb)
    return alarm


def at_sft_loss(lm_loss, logit_v, logit_t, video_label, text_label, lambda_v: float = LAMBDA_V,
                lambda_t: float = LAMBDA_T, *, norm: str = "mean", n_tokens: int | None = None, n_step: float = 1.0):
    """The AT-SFT objective, in one place.

    norm "mean" (the paper's equation, the default):   L = L_base + λ1·L_ATC^v + λ2·L_ATC^t,  L_base the token mean.
    norm "step_sum" (the authors' code under the HF Trainer, recipe.py):
        L = (Σ_tokens CE + λ1·L_ATC^v + λ2·L_ATC^t) / N_step
    with `lm_loss` the micro-batch's token mean over its `n_tokens` label tokens (so Σ CE = lm_loss · n_tokens) and
    N_step the label-token count of the whole optimizer step (HF's num_items_in_batch); the ATC terms stay batch
    means, so their weight is about λ / answer length. A loop that learns N_step only at the step's end passes
    n_step = 1 and divides the step's gradients by N_step (the same gradient: the loss is linear in 1/N_step).

    L_ATC is binary cross-entropy with logits; label 1 = harmful, 0 = safe. logit_*, *_label: (B,).
    Returns (loss, {"lm": ., "atc_v": ., "atc_t": .}) with the parts detached ("lm" the token mean either way).
    """
    bce_v = F.binary_cross_entropy_with_logits(logit_v.float(), video_label.float())  # L_ATC^v
    bce_t = F.binary_cross_entropy_with_logits(logit_t.float(), text_label.float())  # L_ATC^t
    if norm == "mean":
        loss = lm_loss + lambda_v * bce_v + lambda_t * bce_t
    elif norm == "step_sum":
        loss = (lm_loss * n_tokens + lambda_v * bce_v + lambda_t * bce_t) / n_step
    else:
        raise ValueError(f"unknown loss normalisation {norm!r}")
    return loss, {"lm": lm_loss.detach(), "atc_v": bce_v.detach(), "atc_t": bce_t.detach()}
