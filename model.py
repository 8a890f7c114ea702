"""model.py: load a Hugging Face video LLM and give it alarm tokens and ATC heads.

VideoSafety-R1 adds two special tokens to the prompt of a video LLM:

    <|visual_alarm|>   right after the last visual token of the video
    <|textual_alarm|>  at the end of the user query, before the end-of-turn token

Their ordinary token embeddings are *replaced* by two learnable vectors
(zero-initialised, as in the authors' code) before the LLM runs, and two
Alarm-Token-Classification (ATC) heads, one `Linear(hidden, 1)` per modality,
read the final-layer hidden state at each alarm position and predict whether
the video / the text is harmful (label 1) or safe (label 0). AT-SFT trains

    L = L_base + λ1·BCE(ATC_v, y_v) + λ2·BCE(ATC_t, y_t),   λ1 = λ2 = 0.1      (at_sft_loss)

Lifting the alarm tokens into another codebase
-----------------------------------------------
`SafetyAlarm` is self-contained (it needs only torch). For any HF causal LM:

    alarm = add_alarm_tokens(model, tokenizer)        # adds the 2 tokens, attaches the hook
    ...put alarm.visual_token / alarm.textual_token into your prompt text...
    out = model.model(**inputs)                       # the hook swaps in the learnable vectors
    logit_v, logit_t = alarm.classify(out.last_hidden_state, inputs["input_ids"])
    alarm.save(dir) / SafetyAlarm.load(dir, model)

The swap is a forward hook on the input-embedding module, so it works for
training and for `generate` alike with no change to the model's own code.

The rest of this file is plumbing: loading VideoLLaMA3 / Qwen2.5-VL / Qwen3-VL by
name or path, the built-in tiny models, freezing, parameter groups, checkpoints, and the few helpers
that let the stages run under torchrun with FSDP2 (section "Several processes").
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

VISUAL_ALARM = "<|visual_alarm|>"
TEXTUAL_ALARM = "<|textual_alarm|>"
ALARM_FILE = "alarm.safetensors"


# -----------------------------------------------------------------------------
# Alarm tokens + ATC heads (the liftable part)


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


def at_sft_loss(lm_loss, logit_v, logit_t, video_label, text_label, lambda_v: float = 0.1, lambda_t: float = 0.1):
    """The AT-SFT objective, in one place:  L = L_base + λ1·L_ATC^v + λ2·L_ATC^t.

    L_ATC is binary cross-entropy with logits; label 1 = harmful, 0 = safe.
    Returns (loss, {"lm": ., "atc_v": ., "atc_t": .}) with the parts detached.
    """
    bce_v = F.binary_cross_entropy_with_logits(logit_v.float(), video_label.float())  # L_ATC^v
    bce_t = F.binary_cross_entropy_with_logits(logit_t.float(), text_label.float())  # L_ATC^t
    loss = lm_loss + lambda_v * bce_v + lambda_t * bce_t
    return loss, {"lm": lm_loss.detach(), "atc_v": bce_v.detach(), "atc_t": bce_t.detach()}


# -----------------------------------------------------------------------------
# A video LLM with its processor and (optionally) its alarm


@dataclass
class VideoLLM:
    model: nn.Module  # a *ForConditionalGeneration with .model.language_model and .lm_head
    processor: object  # its own AutoProcessor (tokenizer, video processor, chat template)
    alarm: SafetyAlarm | None = None
    source: str = ""  # the name or path it was loaded from
    meta: dict = field(default_factory=dict)  # stage / config of the checkpoint it came from

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_id(self) -> int:
        """End-of-turn token id (<|im_end|> for the Qwen-based families; the tokenizer's EOS otherwise)."""
        vocab = self.tokenizer.get_vocab()
        return vocab["<|im_end|>"] if "<|im_end|>" in vocab else self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def backbone(self, inputs: dict) -> torch.Tensor:
        """Last-layer hidden states (B, T, H) of the model without its LM head."""
        return self.base_forward(**inputs, use_cache=False).last_hidden_state

    def base_forward(self, **kwargs):
        """The model without its LM head (its output: last_hidden_state, past_key_values). With FSDP2 (shard_model)
        this runs as a registered forward method of the sharded top module, so FSDP gathers that module's
        parameters first (and initialises from the top, as it requires)."""
        run = getattr(self.model, BACKBONE, self.model.model)  # BACKBONE is set by shard_model only
        return run(**kwargs)

    def llm_parameters(self):
        """The language model (decoder + LM head): everything trainable outside the alarm."""
        return [p for n, p in self.model.named_parameters() if _is_llm(n)]

    def forward(self, batch: dict, need_lm: bool = True) -> dict:
        """One forward pass on a batch from data.collate.

        Returns {"lm_loss", "n_tokens", "logit_v", "logit_t", "hidden"}. The LM head is applied only at
        label positions (labels != -100), so no (B, T, vocab) tensor is made for the prompt.
        """
        inputs = {k: v for k, v in batch.items() if k in batch.get("model_keys", ())}
        hidden = self.backbone(inputs)  # (B, T, H)
        result = {"hidden": hidden, "logit_v": None, "logit_t": None}
        if need_lm and "labels" in batch:
            labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted from position t
            mask = labels != -100
            logits = self.model.lm_head(hidden[:, :-1][mask])  # (N, V), N = label tokens only
            result["lm_loss"] = F.cross_entropy(logits.float(), labels[mask])  # L_base, token mean
            result["n_tokens"] = int(mask.sum())
        if self.alarm is not None and batch.get("has_alarm", False):
            result["logit_v"], result["logit_t"] = self.alarm.classify(hidden, batch["input_ids"])
        return result


@torch.no_grad()
def generate(llm: VideoLLM, batch: dict, *, max_new_tokens: int = 768, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """Generate from a left-padded prompt batch (data.collate). Eval mode, KV cache on (generating in train
    mode with gradient checkpointing silently turns the cache off). Alarm tokens and image/video
    placeholders are never generated. Decoding is exactly what the arguments say: extras a checkpoint's own
    generation_config may carry (Qwen-Instruct's repetition penalty, top-k) are switched off, as in sample_group.
    Each process generates on its own (no synced_gpus), so a model sharded with FSDP2 must be inside
    `with unsharded(llm):`.

    Returns (completion ids (B, L), padded with pad_token_id after the end-of-turn token, decoded texts).
    """
    if is_sharded(llm) and not _gathered(llm):
        raise RuntimeError("generate on an FSDP2-sharded model: call it inside `with model.unsharded(llm):`")
    tok = llm.tokenizer
    sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    bad = [[i] for i in _banned_ids(llm)]
    inputs = {k: batch[k] for k in batch["model_keys"]}
    with eval_mode(llm):
        out = llm.model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=llm.eot_id,
                                 pad_token_id=tok.pad_token_id, bad_words_ids=bad or None, synced_gpus=False,
                                 repetition_penalty=1.0, **sample)
    completion = out[:, inputs["input_ids"].shape[1]:]  # (B, L)
    return completion, tok.batch_decode(completion_tokens(completion, llm.eot_id), skip_special_tokens=True)


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) mask of real completion tokens: everything up to and INCLUDING the first end-of-turn token
    (the model must learn to stop), nothing after it."""
    is_eos = completion == eos_id
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after


def completion_tokens(completion: torch.Tensor, eos_id: int) -> list[list[int]]:
    mask = completion_mask(completion, eos_id)
    return [row[m].tolist() for row, m in zip(completion, mask)]


def completion_logprobs(llm: VideoLLM, batch: dict, completion: torch.Tensor, mask: torch.Tensor, *,
                        chunk: int = 1024) -> torch.Tensor:
    """log π(o_t | prompt, o_<t) of each completion token: (B, L) fp32, 0 where `mask` is 0.

    batch: the left-padded prompt batch (data.collate, with_target=False) the completions were sampled from;
    completion (B, L): right-padded ids (model.generate); mask (B, L): model.completion_mask.
    The sequence is prompt ++ completion (`prompt_and_completion`); the visual inputs (pixels, or the features
    of `encode_videos`, which skip the vision encoder) are passed as they are, and Qwen's 3-D positions are
    recomputed from input_ids (a training forward never reuses the rope_deltas that generation cached). The backbone runs once; the LM head runs only on the L positions that
    predict completion tokens, `chunk` rows at a time, each chunk recomputed in backward (checkpoint), so no
    (B, T, vocab) logits exist and at most (chunk, vocab) of them at once. Gradients flow iff grad is enabled.
    """
    from torch.utils.checkpoint import checkpoint

    P, L = batch["input_ids"].shape[1], completion.shape[1]
    hidden = llm.backbone(prompt_and_completion(batch, completion, mask))  # (B, P+L, H)
    hidden = hidden[:, P - 1:P + L - 1].flatten(0, 1)  # (B*L, H): position P-1+t predicts completion token t
    targets = completion.flatten()  # (B*L,)
    out = []
    for i in range(0, len(targets), chunk):
        h, t = hidden[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled():  # backward keeps only h; the (chunk, vocab) logits are recomputed
            out.append(checkpoint(_token_logprobs, llm.model.lm_head, h, t, use_reentrant=False))
        else:
            out.append(_token_logprobs(llm.model.lm_head, h, t))
    return torch.cat(out).view(completion.shape) * mask  # (B, L)


def prompt_and_completion(batch: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict:
    """The model inputs of prompt ++ completion: ids (B, P+L), attention mask prompt mask ++ completion mask, and
    per-token processor outputs (Qwen's mm_token_type_ids) extended with zeros (= text) for the completion."""
    ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    inputs = {k: batch[k] for k in batch["model_keys"]}
    for k, v in inputs.items():  # per-token extras (B, P) -> (B, P+L)
        if torch.is_tensor(v) and v.shape == ids.shape and k not in ("input_ids", "attention_mask"):
            inputs[k] = torch.cat([v, v.new_zeros(v.shape[0], completion.shape[1])], dim=1)
    inputs["input_ids"] = torch.cat([ids, completion], dim=1)  # (B, P+L)
    inputs["attention_mask"] = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)  # (B, P+L)
    return inputs


def _token_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(lm_head(hidden))[target] per row: (N, H), (N,) -> (N,), in fp32."""
    logits = lm_head(hidden).float()  # (N, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=-1)  # (N,)


# -----------------------------------------------------------------------------
# GRPO's fast path: one video encoding and one prompt prefill per group
#
# The usual GRPO rollout (`generate(num_return_sequences=G)`) repeats the video's pixels G times, runs the vision
# encoder and prefills the whole prompt G times, and every training forward runs the vision encoder again on G
# copies. Here a group's prompt is collated once (one row), the frozen vision encoder runs once
# (`encode_videos`), the prompt is prefilled once and its KV cache shared by the G samples (`sample_group`), and
# the update's forwards reuse the features for all G rows (`repeat_rows`). Same tokens, same log-probs
# (test_grpo.py checks both against the straightforward path in bench.py).


@torch.no_grad()
def encode_videos(llm: VideoLLM, batch: dict) -> dict:
    """The batch with its videos replaced by their features: the frozen vision encoder + projector run once, here,
    and every later forward on the result (or on `repeat_rows` of it) skips them. HF video LLMs take these as
    `mm_encoder_outputs` (per video: `pooler_output`; Qwen3-VL also `deepstack_features`). The vision weights are
    frozen in every stage, so the features serve the policy, π_old and π_ref alike."""
    if "pixel_values_videos" not in batch:
        return batch
    get = llm.model.model.get_video_features
    params = inspect.signature(get).parameters  # (pixel_values_videos, video_grid_thw[, video_merge_sizes])
    with eval_mode(llm):
        feats = get(**{k: batch[k] for k in params if k in batch}, return_dict=True)
    keep = {"pooler_output": feats.pooler_output}  # tuple: one (tokens, H) tensor per video
    if getattr(feats, "deepstack_features", None) is not None:  # Qwen3-VL: per decoder layer, per video
        keep["deepstack_features"] = feats.deepstack_features
    keys = tuple(k for k in batch["model_keys"] if k != "pixel_values_videos") + ("mm_encoder_outputs",)
    return {**batch, "model_keys": keys, "mm_encoder_outputs": {"video": type(feats)(**keep)}}


def repeat_rows(batch: dict, G: int) -> dict:
    """G copies of a one-row prompt batch (one prompt, at most one video), sharing its video features.
    Every tensor input is per row, per video or per visual token, and the row holds one video, so each is
    concatenated G times along dim 0; the per-video features are repeated alike (no copy of the encoder's work)."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("repeat_rows takes a one-prompt batch")
    out = {k: (torch.cat([v] * G) if torch.is_tensor(v) else v) for k, v in batch.items()}
    out["records"] = list(batch["records"]) * G
    if "mm_encoder_outputs" in batch:
        feats = batch["mm_encoder_outputs"]["video"]
        rep = {"pooler_output": tuple(feats.pooler_output) * G}
        if getattr(feats, "deepstack_features", None) is not None:
            rep["deepstack_features"] = [tuple(layer) * G for layer in feats.deepstack_features]
        out["mm_encoder_outputs"] = {"video": type(feats)(**rep)}
    return out


@torch.no_grad()
def sample_group(llm: VideoLLM, batch: dict, G: int, *, max_new_tokens: int = 768, do_sample: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """G completions of one prompt (a one-row batch, best with its video already encoded) from one prefill.

    The prompt's KV cache is computed once and copied G times; the G rows then decode together, one token per
    step: the logits processing of `generate` (alarm and visual placeholders banned, then temperature, then
    top-p, then a multinomial draw; argmax when not sampling), rows that emitted the end-of-turn token get the
    pad token afterwards, and decoding stops when all rows have ended. Greedy, it returns exactly the tokens of
    `generate` on the same prompt. Returns (completion ids (G, L), decoded texts), as `generate` does."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("sample_group takes a one-prompt batch; collate the record alone")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if is_sharded(llm) and not _gathered(llm):
        raise RuntimeError("sample_group on an FSDP2-sharded model: call it inside `with model.unsharded(llm):`")
    head, tok, base = llm.model.lm_head, llm.tokenizer, llm.model.model
    banned = torch.tensor(_banned_ids(llm), dtype=torch.long, device=llm.device)
    pad = tok.pad_token_id
    with eval_mode(llm):
        if hasattr(base, "rope_deltas"):  # Qwen: a stale value from an earlier forward must not leak in; the
            base.rope_deltas = None  # prefill sets it for a video prompt and leaves None for a text-only one
        out = llm.base_forward(**{k: batch[k] for k in batch["model_keys"]}, use_cache=True)  # the one prefill
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)  # G rows share the prompt's keys and values
        logits = head(out.last_hidden_state[:, -1]).float().expand(G, -1)  # (G, V): the first token's
        P = batch["input_ids"].shape[1]
        attention = batch["attention_mask"].expand(G, -1)  # (G, P); one row: no padding
        rope_deltas = getattr(base, "rope_deltas", None)  # Qwen's 3-D positions: text position + delta
        done = torch.zeros(G, dtype=torch.bool, device=llm.device)
        tokens = []
        for t in range(max_new_tokens):
            logits = logits.index_fill(1, banned, float("-inf")) if len(banned) else logits
            nxt = _sample_next(logits, temperature, top_p) if do_sample else logits.argmax(dim=-1)  # (G,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            done |= nxt == llm.eot_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attention = torch.cat([attention, attention.new_ones(G, 1)], dim=1)  # (G, P+t+1)
            pos = torch.full((G, 1), P + t, dtype=torch.long, device=llm.device)  # the new token's position
            if rope_deltas is not None:
                pos = (pos + rope_deltas.to(pos.device)).expand(3, G, 1)  # (3, G, 1): t, h, w positions alike
            out = llm.base_forward(input_ids=nxt[:, None], attention_mask=attention, position_ids=pos,
                                   past_key_values=cache, use_cache=True)
            logits = head(out.last_hidden_state[:, -1]).float()  # (G, V)
    completion = torch.stack(tokens, dim=1)  # (G, L)
    return completion, tok.batch_decode(completion_tokens(completion, llm.eot_id), skip_special_tokens=True)


@contextlib.contextmanager
def eval_mode(llm: VideoLLM):
    """Eval mode inside (no dropout; generation keeps its KV cache even with gradient checkpointing on), the
    previous mode restored after, also when an exception leaves the block."""
    was_training = llm.model.training
    llm.model.eval()
    try:
        yield
    finally:
        llm.model.train(was_training)


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One multinomial draw per row from the warped distribution: (G, V) -> (G,)."""
    return torch.multinomial(_warp(logits, temperature, top_p).softmax(dim=-1), num_samples=1).squeeze(1)


def _warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature, then top-p (nucleus) filtering, as HF's warpers do: drop the least likely tokens whose
    cumulative probability is at most 1 − top_p (set to −inf); the most likely one always stays."""
    logits = logits / temperature
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # (G, V) in sorted order
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _banned_ids(llm: VideoLLM) -> list[int]:
    """Tokens never generated: the alarm tokens, and image / video placeholders (a forward over prompt ++
    completion would count them as visual tokens and fail when GRPO recomputes the log-probs)."""
    ids = [llm.alarm.visual_id, llm.alarm.textual_id] if llm.alarm is not None else []
    return ids + [i for i in (getattr(llm.model.config, k, None) for k in ("image_token_id", "video_token_id"))
                  if i is not None]


def _is_llm(name: str) -> bool:
    return ".language_model." in name or name.startswith("lm_head.")


def set_trainable(llm: VideoLLM, train_llm: bool, train_alarm: bool, train_heads: bool) -> None:
    """Vision encoder and projector: always frozen. LLM, alarm vectors, ATC heads: each on its own."""
    for n, p in llm.model.named_parameters():
        p.requires_grad_(train_llm and _is_llm(n))
    if llm.alarm is not None:
        llm.alarm.vectors.requires_grad_(train_alarm)
        for p in list(llm.alarm.head_v.parameters()) + list(llm.alarm.head_t.parameters()):
            p.requires_grad_(train_heads)


def param_groups(llm: VideoLLM, lr_llm: float, lr_alarm: float, lr_heads: float, weight_decay: float) -> list[dict]:
    """AdamW groups with the paper's separate learning rates (LLM 1e-6, alarm 1e-5, heads 1e-5).
    Only trainable tensors are included; a group with none is left out."""
    groups = [("llm", lr_llm, [p for p in llm.llm_parameters() if p.requires_grad])]
    if llm.alarm is not None:
        groups.append(("alarm", lr_alarm, [llm.alarm.vectors] if llm.alarm.vectors.requires_grad else []))
        heads = list(llm.alarm.head_v.parameters()) + list(llm.alarm.head_t.parameters())
        groups.append(("heads", lr_heads, [p for p in heads if p.requires_grad]))
    return [{"name": n, "params": ps, "lr": lr, "weight_decay": weight_decay} for n, lr, ps in groups if ps]


# -----------------------------------------------------------------------------
# Training helpers shared by the stages


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float = 0.03):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 (the paper's schedule)."""
    import math

    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device) -> "torch.autocast":
    """bf16 autocast on a GPU that supports it (weights stay fp32: a 1e-6 step on bf16 weights rounds to
    nothing); a no-op elsewhere."""
    on = str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda" if on else "cpu", dtype=torch.bfloat16, enabled=on)


# -----------------------------------------------------------------------------
# Loading and saving


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 on CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(name_or_path: str, *, device: str | None = None, dtype: torch.dtype | str | None = None,
               with_alarm: bool = True, trust_remote_code: bool = False, attn_implementation: str | None = None) -> VideoLLM:
    """Load a video LLM by hub name, local path, stage checkpoint, or built-in tiny name.

    with_alarm: add alarm tokens if the checkpoint has none (a checkpoint saved with them keeps them
    either way; with_alarm=False on a plain model gives the base model as it is, for evaluation).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if name_or_path in TINY_MODELS:
        name_or_path = tiny_model_path(name_or_path)
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    dtype = dtype or default_dtype(device)
    kw = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    processor = AutoProcessor.from_pretrained(name_or_path, **kw)
    processor.tokenizer.padding_side = "left"  # prompts are left-padded for generation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **kw).to(device)
    meta = {}
    meta_file = os.path.join(name_or_path, META_FILE)
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
    alarm = None
    has_saved_alarm = os.path.isfile(os.path.join(name_or_path, ALARM_FILE))
    if has_saved_alarm or with_alarm:
        alarm = add_alarm_tokens(model, processor.tokenizer)  # ids come back the same: they were saved
        if has_saved_alarm:
            alarm.load_state(name_or_path)
        alarm.to(device)
    return VideoLLM(model=model, processor=processor, alarm=alarm, source=name_or_path, meta=meta)


META_FILE = "videosafety_meta.json"
TRAIN_STATE = "train_state.pt"


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss or gradient, nothing to resume from). One clear line."""


def save_checkpoint(llm: VideoLLM, directory: str, meta: dict | None = None) -> None:
    """A directory transformers can load (safetensors weights, tokenizer and processor with the
    alarm tokens) plus alarm.safetensors (vectors + heads) and videosafety_meta.json (config, step).

    Atomic: files are written to a temporary folder first, then each is renamed into place, the
    metadata last, so a crash mid-save never leaves a mix that looks complete.

    Sharded (FSDP2): every rank must call it; the full weights are gathered to rank 0's CPU and rank 0 writes
    the same ordinary directory, loadable in one process without torchrun."""
    state_dict = full_state_dict(llm) if is_sharded(llm) else None  # a collective: all ranks take part
    if dist_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".saving-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        llm.model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        llm.processor.save_pretrained(tmp)
        if llm.alarm is not None:
            llm.alarm.save(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta or {}, f, indent=2, default=str)
        for name in sorted(os.listdir(tmp), key=lambda n: n == META_FILE):  # metadata last
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        os.rmdir(tmp)
    barrier()  # no rank goes on (or reads the directory) before it is complete


def save_train_state(directory: str, llm: VideoLLM, optimizer, scheduler, state: dict) -> None:
    """A resumable snapshot: the model checkpoint plus optimizer, scheduler, RNG and loop state.
    Written to `directory`.tmp, then swapped in by renames; the previous snapshot survives until then.

    Sharded (FSDP2): every rank calls it; rank 0 writes the full (unsharded) optimizer state in the format of a
    one-process `optimizer.state_dict()`, so the run resumes under any number of processes, one included.
    The RNG states are rank 0's."""
    import random

    tmp, old = directory + ".tmp", directory + ".old"
    if dist_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(llm, tmp, meta={"resume_state": state})
    optimizer_state = full_optimizer_state_dict(llm, optimizer) if is_sharded(llm) else optimizer.state_dict()
    if dist_rank() == 0:
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "state": state,
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(tmp, TRAIN_STATE))
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def find_train_state(directory: str) -> str | None:
    """The snapshot to resume from (or the previous one, if a crash hit between the two renames)."""
    for d in (directory, directory + ".old"):
        if os.path.isfile(os.path.join(d, TRAIN_STATE)) and os.path.isfile(os.path.join(d, META_FILE)):
            return d
    return None


def load_train_state(directory: str, optimizer, scheduler, llm: VideoLLM | None = None) -> dict:
    """Restore optimizer, scheduler and RNG states saved by save_train_state; return the loop state.
    (The model itself is loaded from the same directory with load_model.) Sharded: pass `llm`; each rank
    takes its shard of the full optimizer state (memory-mapped, so the ranks share one copy in RAM)."""
    import random

    sharded = llm is not None and is_sharded(llm)
    ckpt = torch.load(os.path.join(directory, TRAIN_STATE), weights_only=True, **({"mmap": True} if sharded else {}))
    if sharded:
        load_full_optimizer_state_dict(llm, optimizer, ckpt["optimizer"])
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(_as_tuple(ckpt["python_rng"]))
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["state"]


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def check_finite(loss: float, grad_norm, step: int, resume_dir: str) -> None:
    """Stop on a non-finite loss or gradient before the optimizer step spoils the weights."""
    import math

    if not math.isfinite(float(loss)) or not math.isfinite(float(grad_norm)):
        raise TrainingError(f"step {step}: non-finite loss ({float(loss)}) or gradient norm ({float(grad_norm)}); "
                            f"weights were not updated. The last good snapshot is in {resume_dir} (if any was saved): "
                            "lower the learning rate or check the data, then rerun with --resume.")


# -----------------------------------------------------------------------------
# Several processes: torchrun + FSDP2. Without torchrun every function here is a no-op (or the one-process
# call), so one process runs exactly as before. nanoGPT style: torchrun's RANK variable switches it on.
#
# Layout: each decoder layer is one FSDP2 unit and the top module the root (embeddings, vision encoder,
# projector, final norm, LM head). A unit's parameters are all-gathered just before it runs and freed after,
# its gradients reduce-scattered (averaged over ranks) in backward; each rank keeps 1/world of the weights,
# gradients and AdamW states. FSDP2 shards per parameter, so frozen (vision) and trainable parameters share
# the root. The vision encoder is not a unit of its own: HF's generate runs it outside the model's forward
# (to encode the video once), and a unit run before the root would make FSDP2 fail.
# The SafetyAlarm (2 vectors + 2 heads: a few thousand numbers) lives outside the HF model and is reached
# through a hook and `classify`, not a module forward FSDP could wrap, so it stays whole on every rank and
# its gradients are averaged with one all-reduce each (all_reduce_alarm_grads).

BACKBONE = "vsr1_backbone"  # the method name shard_model registers with FSDP2 (see VideoLLM.base_forward)


def init_distributed(device: str | None = None) -> tuple[int, int, int, str | None]:
    """Join the process group when launched by torchrun. Returns (rank, world, local_rank, device): this
    process's device (cuda:LOCAL_RANK with nccl, or cpu with gloo); (0, 1, 0, `device`) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0, device
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    device = device or default_device()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if dist_world() > 1:
        dist.barrier()


def all_reduce_sum(values: list) -> list:
    """Element-wise sum of a list of numbers over ranks (fp64); the list itself in one process."""
    import torch.distributed as dist

    if dist_world() == 1:
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def union_over_ranks(d: dict) -> dict:
    """The union of each rank's dict (all_gather_object); `d` itself in one process."""
    import torch.distributed as dist

    if dist_world() == 1:
        return d
    parts = [None] * dist_world()
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_sharded(llm: VideoLLM) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(llm.model, FSDPModule)


def shard_model(llm: VideoLLM, device: str) -> None:
    """Shard `llm` with FSDP2's fully_shard over all ranks (see the layout above) and move it to `device`.
    Call it once, after loading (on CPU) and before making the optimizer."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

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


def _fsdp_units(llm: VideoLLM) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in llm.model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(llm: VideoLLM):
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


def _gathered(llm: VideoLLM) -> bool:
    """Are the decoder layers' full weights in place (inside `unsharded`)? They are DTensor shards otherwise."""
    from torch.distributed.tensor import DTensor

    return not isinstance(next(llm.model.model.language_model.layers[0].parameters()), DTensor)


def all_reduce_alarm_grads(llm: VideoLLM) -> None:
    """Average the replicated SafetyAlarm's gradients over ranks, as FSDP does for the sharded weights."""
    import torch.distributed as dist

    if dist_world() == 1 or llm.alarm is None:
        return
    for p in llm.alarm.parameters():
        if p.requires_grad:
            if p.grad is None:  # this rank's micro-batches were all skipped: it contributes zeros
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist_world()


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also over a mix of FSDP2-sharded (DTensor) and replicated parameters,
    which torch's own cannot stack: ‖g‖ = sqrt(‖g_sharded‖² + ‖g_replicated‖²), the sharded part's norm
    taken over all ranks' shards. Returns the total norm before clipping."""
    from torch.distributed.tensor import DTensor

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


def full_state_dict(llm: VideoLLM) -> dict:
    """The HF model's full weights as ordinary CPU tensors on rank 0 (an empty dict on the other ranks).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(llm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _with_alarm(llm: VideoLLM) -> nn.Module:
    """One module holding the HF model and the alarm, so every optimizer parameter has a name."""
    return nn.ModuleDict({"model": llm.model, **({"alarm": llm.alarm} if llm.alarm is not None else {})})


def full_optimizer_state_dict(llm: VideoLLM, optimizer) -> dict:
    """The optimizer's full (unsharded) state on rank 0, keyed like a one-process `optimizer.state_dict()`
    (parameters numbered in param_groups order); {} on the other ranks. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(_with_alarm(llm), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_rank() != 0:
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(llm, optimizer))}
    return {"state": {index[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]}


def load_full_optimizer_state_dict(llm: VideoLLM, optimizer, state: dict) -> None:
    """Load a full optimizer state (full_optimizer_state_dict's or a one-process run's) into a sharded
    optimizer: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_names(llm, optimizer)
    full = {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(_with_alarm(llm), optimizer, full, options=StateDictOptions(full_state_dict=True))


def _optimizer_names(llm: VideoLLM, optimizer) -> list[str]:
    names = {id(p): n for n, p in _with_alarm(llm).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


# -----------------------------------------------------------------------------
# Built-in tiny models: each family's real config class, small sizes, a locally trained tokenizer.
# They go through save_pretrained / from_pretrained like any checkpoint.

TINY_MODELS = ("tiny-videollama3", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

# ChatML, the shape of the real Qwen2.5-VL / Qwen3-VL / VideoLLaMA3 templates (system turn, user content
# as a list of video / text items, assistant generation prompt).
_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}VIDEO_BLOCK"
    "{% elif item['type'] == 'image' %}IMAGE_BLOCK"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(family: str) -> str:
    if family == "videollama3":  # VideoLLaMA3 puts the frames ("Time t s:<pads>,...") then a newline
        return _CHATML.replace("VIDEO_BLOCK", "<|video_pad|>\n").replace("IMAGE_BLOCK", "<|image_pad|>\n")
    return (_CHATML.replace("VIDEO_BLOCK", "<|vision_start|><|video_pad|><|vision_end|>")
            .replace("IMAGE_BLOCK", "<|vision_start|><|image_pad|><|vision_end|>"))


def tiny_model_path(name: str, cache_dir: str | None = None) -> str:
    """Build (once) and return the directory of a built-in tiny model."""
    cache_dir = cache_dir or os.environ.get("VSR1_TINY_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".tiny_models"))
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_tiny(name, path)
    return path


def _train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE trained locally with `tokenizers`, with the Qwen family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=8192)


def build_tiny(name: str, path: str, seed: int = 0) -> None:
    """Write a tiny random model of `name`'s family to `path` (offline; fixed seed)."""
    from data import demo_corpus  # the tokenizer is trained on the demo's text (lazy: data imports model)
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor,
                              VideoLlama3Config, VideoLlama3ForConditionalGeneration, VideoLlama3ImageProcessor,
                              VideoLlama3Processor, VideoLlama3VideoProcessor)

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    torch.manual_seed(seed)
    tok = _train_tokenizer(demo_corpus(), vocab_size=1024)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    vocab = ((len(tok) + 2 + 63) // 64) * 64  # spare rows, as real checkpoints have (alarm tokens fit)
    H, heads = 64, 4
    text = dict(vocab_size=vocab, hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    pix = dict(min_pixels=28 * 28, max_pixels=56 * 56)  # 56x56 frames -> 16 patches -> 4 tokens
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    family = name.removeprefix("tiny-")
    if family == "videollama3":
        cfg = VideoLlama3Config(
            text_config=dict(model_type="qwen2", **text),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               patch_size=14),
            **common)
        model = VideoLlama3ForConditionalGeneration(cfg)
        size = {"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"]}
        video_size = {"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"] * 90}  # a budget per video
        proc = VideoLlama3Processor(
            image_processor=VideoLlama3ImageProcessor(size=size, patch_size=14),
            video_processor=VideoLlama3VideoProcessor(size=video_size, patch_size=14, use_token_compression=False),
            tokenizer=tok, chat_template=chat_template(family))
    elif family == "qwen2.5-vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        cfg = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H,
                               patch_size=14, window_size=56, fullatt_block_indexes=[0]),
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **common)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
        size = {"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"]}
        proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size),
                                   video_processor=Qwen2VLVideoProcessor(size=size),
                                   tokenizer=tok, chat_template=chat_template(family))
    else:  # qwen3-vl
        text.update(head_dim=H // heads,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                     "rope_theta": 10000.0})
        cfg = Qwen3VLConfig(
            text_config=text,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H,
                               patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0]),
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **common)
        model = Qwen3VLForConditionalGeneration(cfg)
        size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64 * 90}  # Qwen3-VL's budget counts frames too
        proc = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, patch_size=16),
                                video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16, do_sample_frames=False),
                                tokenizer=tok, chat_template=chat_template(family))
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    tmp = f"{path}.tmp{os.getpid()}"  # write aside, then rename: a half-built model is never picked up
    model.save_pretrained(tmp, safe_serialization=True)
    proc.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
