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

Each head's decision threshold is fitted on held-out records (`fit_threshold`, by the training stages) and saved
with the heads: `alarm.thresholds["v"]`, p(harmful) >= it means harmful. `auroc` is the threshold-free ranking score.

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
DEFAULT_THRESHOLD = 0.5  # p >= 0.5 (logit >= 0): the cut of a BCE-trained head before any calibration
HEADS = ("v", "t")  # the video head, the text head: the keys of SafetyAlarm.thresholds


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
        # decision thresholds on p(harmful) per head and how each was set; saved in alarm.safetensors' metadata
        self.thresholds = {h: DEFAULT_THRESHOLD for h in HEADS}
        self.threshold_notes = {h: "default 0.5: never calibrated" for h in HEADS}
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
        meta = {"hidden_size": str(self.vectors.shape[1])}
        for h in HEADS:  # repr(float) reads back to the same float
            meta[f"threshold_{h}"], meta[f"threshold_note_{h}"] = repr(float(self.thresholds[h])), self.threshold_notes[h]
        save_file(state, os.path.join(directory, ALARM_FILE), metadata=meta)

    def load_state(self, directory: str) -> None:
        """Vectors, heads and thresholds. A file saved before thresholds existed gives 0.5, and says so."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(directory, ALARM_FILE)
        self.load_state_dict(load_file(path))
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        for h in HEADS:
            if f"threshold_{h}" in meta:
                self.thresholds[h], self.threshold_notes[h] = float(meta[f"threshold_{h}"]), meta[f"threshold_note_{h}"]
            else:
                self.thresholds[h], self.threshold_notes[h] = DEFAULT_THRESHOLD, "default 0.5: saved before calibration"


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


# -----------------------------------------------------------------------------
# Calibration: the ranking score and the decision threshold of a head, from held-out (label, p) pairs


def auroc(labels, scores) -> float | None:
    """Area under the ROC curve by the Mann-Whitney U statistic, tied scores sharing their mean rank:
    AUROC = (R_pos − n_pos(n_pos + 1)/2) / (n_pos·n_neg), R_pos = the sum of the positives' 1-based ranks.
    None when the labels hold one class only."""
    y, s = [int(v) for v in labels], [float(x) for x in scores]
    n_pos = sum(y)
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(s)), key=s.__getitem__)
    rank, i = [0.0] * len(s), 0
    while i < len(order):  # a run of equal scores gets the mean of the ranks it spans
        j = i
        while j + 1 < len(order) and s[order[j + 1]] == s[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            rank[k] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(r for r, v in zip(rank, y) if v)
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def fit_threshold(labels, scores) -> tuple[float, str]:
    """The decision threshold on p(harmful) (harmful iff p >= threshold) that maximises balanced accuracy
    (TPR + TNR)/2 on held-out (label, p) pairs; returns (threshold, a note saying how it was set).

    Why balanced accuracy: it does not depend on how many harmful records the split happens to hold (plain
    accuracy on a small, skewed split drifts toward calling everything the majority class).
    Candidates: every threshold in the same gap between two neighbouring distinct scores classifies the split the
    same way, so each gap is represented by its midpoint. Several gaps equally good: the one whose midpoint is
    nearest 0.5 (the heads' trained cut), then the lower. Balanced accuracies are compared exactly as integers,
    2·n_pos·n_neg·BA = TP·n_neg + TN·n_pos.
    Falls back to 0.5, with the reason in the note: no records; one class only; all scores equal; or no gap beating
    BA 0.5 (the head does not separate the classes, so no threshold can be trusted).
    """
    y, s = [int(v) for v in labels], [float(x) for x in scores]
    n_pos = sum(y)
    n_neg = len(y) - n_pos
    if not y:
        return DEFAULT_THRESHOLD, "default 0.5: no held-out records"
    if n_pos == 0 or n_neg == 0:
        kind = "harmful" if n_neg == 0 else "safe"
        return DEFAULT_THRESHOLD, f"default 0.5: all {len(y)} held-out records are {kind}, nothing to separate"
    pairs = sorted(zip(s, y))
    best = None  # (key to minimise, threshold, 2·n_pos·n_neg·BA)
    pos_below = neg_below = i = 0  # records strictly below the current gap, by label
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:  # one distinct score and all its records
            pos_below += pairs[j][1]
            neg_below += 1 - pairs[j][1]
            j += 1
        if j == len(pairs):
            break
        thr = (pairs[i][0] + pairs[j][0]) / 2  # the gap between this score and the next one
        score = (n_pos - pos_below) * n_neg + neg_below * n_pos  # TP·n_neg + TN·n_pos
        key = (-score, abs(thr - DEFAULT_THRESHOLD), thr)
        if best is None or key < best[0]:
            best = (key, thr, score)
        i = j
    if best is None:
        return DEFAULT_THRESHOLD, f"default 0.5: all {len(y)} held-out scores are equal"
    if best[2] * 2 <= 2 * n_pos * n_neg:  # BA <= 0.5
        return DEFAULT_THRESHOLD, f"default 0.5: no threshold beats balanced accuracy 0.5 on {len(y)} held-out records"
    ba = best[2] / (2 * n_pos * n_neg)
    return best[1], f"fitted on {len(y)} held-out records ({n_pos} harmful): balanced accuracy {ba:.4f}"
