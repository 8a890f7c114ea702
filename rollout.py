"""rollout.py: GRPO's fast path, one video (or image) encoding and one prompt prefill per group.

The usual GRPO rollout (`generate(num_return_sequences=G)`) repeats the video's pixels G times, runs the vision
encoder and prefills the whole prompt G times, and every training forward runs the vision encoder again on G
copies. Here a group's prompt is collated once (one row), the frozen vision encoder runs once
(`encode_videos`), the prompt is prefilled once and its KV cache shared by the G samples (`sample_group`), and
the update's forwards reuse the features for all G rows (`repeat_rows`). Same tokens, same log-probs
(test_rollout.py checks both against the straightforward path in bench.py). A step's P prompts decode together
(`sample_groups`): each prefilled alone, their caches stacked left-padded, the P × G rows one batch per token, each
prompt with its own generator, so its tokens are those of decoding it alone. Decoding reads all the weights per
token whatever the batch, so on a GPU one loop for P prompts costs about what one prompt's does.

Sampling is `generate`'s: the banned tokens, temperature, top-k, then top-p (nucleus) filtering exactly as
transformers' warpers do it (`warp`), found among the candidates instead of a sort of the whole vocabulary, then
one multinomial draw per row among them (`sample_next`).
"""

from __future__ import annotations

import inspect

import torch

import distributed
import model as M


# the visual inputs a batch may carry: (mm_encoder_outputs key, pixel key, the HF model's feature method)
MODALITIES = (("video", "pixel_values_videos", "get_video_features"), ("image", "pixel_values", "get_image_features"))


@torch.no_grad()
def encode_videos(llm: M.VideoLLM, batch: dict) -> dict:
    """The batch with its videos (and images) replaced by their features: the frozen vision encoder + projector run
    once, here, and every later forward on the result (or on `repeat_rows` of it) skips them. HF video LLMs take
    these as `mm_encoder_outputs` (per video or image: `pooler_output`; Qwen3-VL also `deepstack_features`). The
    vision weights are frozen in every stage, so the features serve the policy, π_old and π_ref alike."""
    feats_of, keys = {}, tuple(batch["model_keys"])
    for modality, pixels, method in MODALITIES:
        if pixels not in batch:
            continue
        get = getattr(llm.model.model, method)
        params = inspect.signature(get).parameters  # (pixel_values[_videos], *_grid_thw[, *_merge_sizes])
        with M.eval_mode(llm):
            feats = get(**{k: batch[k] for k in params if k in batch}, return_dict=True)
        keep = {"pooler_output": feats.pooler_output}  # tuple: one (tokens, H) tensor per video or image
        if getattr(feats, "deepstack_features", None) is not None:  # Qwen3-VL: per decoder layer, per video/image
            keep["deepstack_features"] = feats.deepstack_features
        feats_of[modality] = type(feats)(**keep)
        keys = tuple(k for k in keys if k != pixels)
    if not feats_of:
        return batch
    return {**batch, "model_keys": keys + ("mm_encoder_outputs",), "mm_encoder_outputs": feats_of}


def repeat_rows(batch: dict, G: int) -> dict:
    """G copies of a one-row prompt batch (one prompt: one video or its images), sharing its visual features.
    Every tensor input is per row, per video / image or per visual token, and all of them belong to the one row, so
    each is concatenated G times along dim 0; the per-video / per-image features are repeated alike (no copy of the
    encoder's work)."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("repeat_rows takes a one-prompt batch")
    out = {k: (torch.cat([v] * G) if torch.is_tensor(v) else v) for k, v in batch.items()}
    out["records"] = list(batch["records"]) * G
    if "mm_encoder_outputs" in batch:
        out["mm_encoder_outputs"] = {}
        for modality, feats in batch["mm_encoder_outputs"].items():
            rep = {"pooler_output": tuple(feats.pooler_output) * G}
            if getattr(feats, "deepstack_features", None) is not None:
                rep["deepstack_features"] = [tuple(layer) * G for layer in feats.deepstack_features]
            out["mm_encoder_outputs"][modality] = type(feats)(**rep)
    return out


def sample_group(llm: M.VideoLLM, batch: dict, G: int, *, max_new_tokens: int = M.MAX_NEW_TOKENS,
                 do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[str]]:
    """G completions of one prompt (a one-row batch, best with its video already encoded) from one prefill:
    `sample_groups` with one prompt. generator: its draws' (None: the global generator). Greedy, it returns
    exactly the tokens of `generate` on the same prompt. Returns (completion ids (G, L), decoded texts)."""
    return sample_groups(llm, [batch], G, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_p=top_p, top_k=top_k, generators=None if generator is None else [generator])[0]


@torch.no_grad()
def sample_groups(llm: M.VideoLLM, batches: list[dict], G: int, *, max_new_tokens: int = M.MAX_NEW_TOKENS,
                  do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  generators: list | None = None) -> list[tuple[torch.Tensor, list[str]]]:
    """G completions of each of several prompts (one-row batches, best with their videos already encoded), all
    decoded in one loop: a GRPO step's prompts cost one decode loop, not one each.

    Each prompt is prefilled once, alone (its own video, its own Qwen rope delta), and its KV cache copied G times;
    the caches are left-padded to the longest prompt and stacked (`_stack_caches`), so the P × G rows then decode
    together, one token per step, each row at its own prompt's positions (the padding masked out). Sampling is
    `generate`'s logits processing per row: alarm and visual placeholders banned, then temperature, top-k, top-p
    and a multinomial draw (`sample_next`; argmax when not sampling). Rows that emitted the end-of-turn token get
    the pad token afterwards; a prompt whose G rows have all ended leaves the batch (its rows are dropped from the
    cache), and decoding stops when none is left.

    generators: one torch.Generator per prompt (on the logits' device): prompt p's rows are filtered and drawn with
    its own, so its tokens are exactly those of `sample_group` on that prompt alone with that generator (or after
    torch.manual_seed with its seed), whatever the other prompts are, up to the rounding of batched matmuls (none
    seen in fp32 on CPU; a near-tie can flip a draw in bf16). None: the global generator, all rows in one draw.
    Returns per prompt (completion ids (G, L_p), right-padded, L_p its own length; decoded texts)."""
    if not batches:
        return []
    if any(b["input_ids"].shape[0] != 1 for b in batches):
        raise ValueError("sample_groups takes one-prompt batches; collate each record alone")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if generators is not None and len(generators) != len(batches):
        raise ValueError(f"one generator per prompt: {len(generators)} for {len(batches)} prompts")
    distributed.check_gathered(llm, "sample_groups")
    head, tok, base = llm.model.lm_head, llm.tokenizer, llm.model.model
    banned = torch.tensor(M.banned_ids(llm), dtype=torch.long, device=llm.device)
    pad, qwen = tok.pad_token_id, hasattr(base, "rope_deltas")  # Qwen: 3-D positions, text position + delta
    with M.eval_mode(llm):
        caches, logits, delta = [], [], []
        for b in batches:  # one prefill per prompt, each with its own video features
            if qwen:  # a stale value from an earlier forward must not leak in; the prefill sets it for a
                base.rope_deltas = None  # video prompt and leaves None for a text-only one
            out = llm.base_forward(**{k: b[k] for k in b["model_keys"]}, use_cache=True)
            caches.append(out.past_key_values)
            logits.append(head(out.last_hidden_state[:, -1]).float().expand(G, -1))  # (G, V): the first token's
            rd = getattr(base, "rope_deltas", None)
            delta.append(0 if rd is None else int(rd.reshape(-1)[0]))
        if qwen:
            base.rope_deltas = None  # the decode below passes its positions; nothing stale for later forwards
        lengths = torch.tensor([b["input_ids"].shape[1] for b in batches], device=llm.device)  # (P,)
        cache, attention = _stack_caches(caches, lengths, G)  # (P·G, ..., T) left-padded; (P·G, T)
        logits = torch.cat(logits)  # (P·G, V)
        start = (lengths + torch.tensor(delta, device=llm.device)).repeat_interleave(G)[:, None]  # (P·G, 1)
        live = list(range(len(batches)))  # the prompts still decoding; live[i] holds rows i·G .. i·G+G-1
        done = torch.zeros(len(live) * G, dtype=torch.bool, device=llm.device)
        tokens = [[] for _ in batches]
        for t in range(max_new_tokens):
            if len(banned):  # in place: logits is this step's own tensor
                logits.index_fill_(1, banned, float("-inf"))
            if not do_sample:
                nxt = logits.argmax(dim=-1)  # (R,)
            else:
                gens = None if generators is None else [generators[p] for p in live]
                nxt = sample_next(logits, temperature, top_p, top_k, generators=gens)  # (R,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == llm.eot_id
            for i, p in enumerate(live):
                tokens[p].append(nxt[i * G:(i + 1) * G])
            if t == max_new_tokens - 1:
                break
            ended = done.view(len(live), G).all(dim=1)  # (P_live,): all G rows of the prompt ended
            if bool(ended.any()):  # drop them: the others decode on without their rows
                keep = (~ended).repeat_interleave(G).nonzero().squeeze(1)  # (R',)
                live = [p for p, e in zip(live, ended.tolist()) if not e]
                if not live:
                    break
                cache.batch_select_indices(keep)
                attention, start, done, nxt = attention[keep], start[keep], done[keep], nxt[keep]
            R = len(live) * G
            attention = torch.cat([attention, attention.new_ones(R, 1)], dim=1)  # (R, T+t+1)
            pos = start + t  # (R, 1): the new token's position (+ the rope delta)
            if qwen:
                pos = pos.expand(3, R, 1)  # (3, R, 1): t, h, w positions alike for text
            out = llm.base_forward(input_ids=nxt[:, None], attention_mask=attention, position_ids=pos,
                                   past_key_values=cache, use_cache=True)
            logits = head(out.last_hidden_state[:, -1]).float()  # (R, V)
    result = []
    for rows in tokens:
        completion = torch.stack(rows, dim=1)  # (G, L_p)
        result.append((completion, tok.batch_decode(M.completion_tokens(completion, llm.eot_id),
                                                    skip_special_tokens=True)))
    return result


def _stack_caches(caches: list, lengths: torch.Tensor, G: int):
    """One KV cache for P prompts' G rows each: prompt p's keys and values (1, heads, T_p, d) left-padded with zeros
    to the longest T and repeated G times, prompt after prompt -> (P·G, heads, T, d) per layer; and the attention
    mask (P·G, T), 0 on the padding. Returns (the first prompt's cache object, now holding all rows; the mask)."""
    T_max = int(lengths.max())
    cache = caches[0]
    for i, layer in enumerate(cache.layers):
        if not hasattr(layer, "keys") or getattr(layer, "is_sliding", False):
            raise NotImplementedError(f"sample_groups stacks full-attention KV caches; layer {i} is a "
                                      f"{type(layer).__name__}")
        for name in ("keys", "values"):
            parts = [getattr(c.layers[i], name) for c in caches]  # each (1, heads, T_p, d)
            stacked = parts[0].new_zeros(len(parts) * G, *parts[0].shape[1:2], T_max, parts[0].shape[-1])
            for p, x in enumerate(parts):
                stacked[p * G:(p + 1) * G, :, T_max - x.shape[2]:] = x  # left padding: the prompt ends at T_max
            setattr(layer, name, stacked)
    positions = torch.arange(T_max, device=lengths.device)  # (T,)
    attention = (positions[None] >= (T_max - lengths)[:, None]).long().repeat_interleave(G, dim=0)  # (P·G, T)
    return cache, attention


# -----------------------------------------------------------------------------
# Sampling: transformers' warpers (temperature, top-k, top-p), at the cost of the model, not of the vocabulary

CANDIDATES = 64  # without top-k: the first guess of the nucleus size, grown x8 while the rest holds too much mass


def filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0):
    """The warped distribution of `generate` (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in
    that order), kept as candidates: (ids (R, m), their warped logits (R, m), −inf where filtered out); every id
    outside `ids` is filtered out. ids is None when the whole vocabulary is returned ((R, V) logits).

    Top-k keeps the ids whose logit is at least the k-th largest (ties with it stay, as in HF). Top-p drops, in
    ascending order, the ids whose cumulative probability is at most 1 − top_p, the most likely always kept. HF
    sorts the whole vocabulary for it; here the nucleus is found among the candidates: the top-k ones (one topk
    of k + 1 over the vocabulary, `_among_top_k`, when no tie sits at the k-th), or the largest m (all ties with
    the m-th included) once the mass outside them is below 1 − top_p, so every id outside is dropped and the cut
    falls among the candidates, ordered as HF's ascending sort orders them. Two things this arithmetic cannot
    decide alike, so the step falls back to HF's own full sort (`_top_p_sorted`): a cumulative probability within
    rounding (1000 ulp) of 1 − top_p (the sums run in another order), and a cut between equal logits (which of
    them HF drops depends on its sort's order among ties)."""
    if temperature != 1.0:  # TemperatureLogitsWarper (x / 1.0 is x exactly: one pass over the vocabulary saved)
        logits = logits / temperature
    V = logits.shape[1]
    top_k = min(top_k, V) if top_k > 0 else 0
    if top_p >= 1.0 and not top_k:
        return None, logits
    if 0 < top_k < V:
        found = _among_top_k(logits, top_k, top_p)
        if found is not None:
            return found
    if top_k:  # TopKLogitsWarper: below the k-th largest logit -> -inf
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    m, cut = top_k or min(CANDIDATES, V), 1.0 - top_p
    tol = 1000 * torch.finfo(logits.dtype).eps
    probs = logits.softmax(dim=-1) if top_p < 1.0 else None  # (R, V)
    while m < V:
        largest = logits.topk(m)
        inside = (logits >= largest.values[:, -1:]) & (logits > float("-inf"))  # (R, V), closed under ties
        n = int(inside.sum(dim=1).max())
        ids = (largest.indices if n == m else logits.topk(n).indices).sort(dim=1).values  # (R, n) in id order
        vals = logits.gather(1, ids).masked_fill(~inside.gather(1, ids), float("-inf"))  # (R, n); a row's extras out
        if top_p >= 1.0:
            return ids, vals
        rest = probs.masked_fill(inside, 0.0).sum(dim=1, keepdim=True)  # (R, 1): the mass outside the candidates
        if bool((rest > cut - tol).any()):  # the nucleus reaches outside: more candidates
            m = m * 8 if m * 8 < V // 2 else V
            continue
        order = vals.argsort(dim=1, stable=True)  # ascending, as HF's sort (the order among ties is settled below)
        ids, vals = ids.gather(1, order), vals.gather(1, order)
        kept = _nucleus(rest + probs.gather(1, ids).masked_fill(vals == float("-inf"), 0.0).cumsum(dim=1), vals, cut)
        if kept is None:
            break  # undecidable here: HF's own computation below
        return ids, kept
    return None, (_top_p_sorted(logits, top_p) if top_p < 1.0 else logits)


def _among_top_k(logits: torch.Tensor, k: int, top_p: float):
    """filtered's common case with top-k: one topk of k + 1 finds the k candidates, and with no tie at the k-th
    (the (k+1)-th strictly below it) they are exactly TopKLogitsWarper's survivors; top-p then runs on k values,
    the softmax over them being HF's over the top-k-masked vocabulary up to rounding (the −inf add exact zeros).
    None where this cannot decide as HF does (a tie at the k-th, fewer than k finite logits, a cut within
    rounding or between ties): filtered's general path takes over."""
    vals, ids = logits.topk(k + 1)  # (R, k+1), descending
    if not bool((vals[:, k] < vals[:, k - 1]).all()):
        return None
    vals, ids = vals[:, :k].flip(1), ids[:, :k].flip(1)  # the k candidates, ascending as HF's sort orders them
    if top_p >= 1.0:
        return ids, vals
    kept = _nucleus(vals.softmax(dim=1).cumsum(dim=1), vals, 1.0 - top_p)
    return None if kept is None else (ids, kept)


def _nucleus(cum: torch.Tensor, vals: torch.Tensor, cut: float):
    """TopPLogitsWarper's cut on ascending candidates: drop where the cumulative probability is at most 1 − top_p,
    the last (most likely) always kept. None when the cut is within rounding (1000 ulp) of a cumulative value or
    falls between equal logits: HF's full sort must decide those."""
    drop = cum <= cut  # (R, n)
    drop[:, -1] = False  # the most likely id always stays
    tie_cut = (drop[:, 1:] != drop[:, :-1]) & (vals[:, 1:] == vals[:, :-1])
    if bool(((cum - cut).abs() < 1000 * torch.finfo(cum.dtype).eps).any() or tie_cut.any()):
        return None
    return vals.masked_fill(drop, float("-inf"))


def _top_p_sorted(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper's own arithmetic, with a sort of the whole vocabulary: (R, V) -> (R, V)."""
    ascending, order = logits.sort(dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # (R, V) in sorted order
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def warp(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """The warped logits over the whole vocabulary (−inf where filtered), exactly HF's warpers': (R, V) -> (R, V)."""
    ids, vals = filtered(logits, temperature, top_p, top_k)
    return vals if ids is None else torch.full_like(logits, float("-inf")).scatter(1, ids, vals)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0,
                generators: list | None = None) -> torch.Tensor:
    """One draw per row from the warped distribution, among the candidates only: (R, V) -> (R,).
    generators: one torch.Generator per block of rows (R / len(generators) rows each: one prompt's group); each
    block is filtered and drawn on its own, so its draws are those of that block alone with that generator, whatever
    the other blocks hold (their candidates' count, a fallback to the full sort); None: all rows at once, with the
    global generator."""
    if generators is not None:
        return torch.cat([_draw(block, temperature, top_p, top_k, g)
                          for block, g in zip(logits.chunk(len(generators)), generators)])
    return _draw(logits, temperature, top_p, top_k, None)


def _draw(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    ids, vals = filtered(logits, temperature, top_p, top_k)
    pick = torch.multinomial(vals.softmax(dim=-1), num_samples=1, generator=generator)  # (R, 1) among the candidates
    return (pick if ids is None else ids.gather(1, pick)).squeeze(1)
