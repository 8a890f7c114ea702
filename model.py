"""model.py: a Hugging Face video LLM with its processor and alarm, as every stage uses it.

- `load_model` loads VideoLLaMA3 / Qwen2.5-VL / Qwen3-VL (any `AutoModelForImageTextToText`) by hub name, local
  path, stage checkpoint or built-in tiny name (demo.py), and gives it the alarm tokens (alarm.py);
  `save_checkpoint` writes a directory transformers loads as it is, plus the alarm and the run's metadata.
- `VideoLLM.forward` computes L_base, the token-mean cross-entropy on the assistant's tokens, applying the LM head
  only at label positions, and the ATC logits at the alarm positions.
- `generate` decodes a left-padded prompt batch; `completion_mask` keeps each completion up to and including its
  first end-of-turn token; `completion_logprobs` gives log π(o_t | q, o_<t) with the LM head at completion
  positions only (GRPO's ratio and KL).
- `set_trainable` / `param_groups`: which parameters train in each stage (the vision encoder and projector never)
  and their learning rates; with LoRA adapters (lora.py, --lora) the adapters are the LLM's trainable part and
  `save_checkpoint` writes them merged in (a plain model).

GRPO's rollout (one video encoding, one prefill per group) is in rollout.py; several processes in distributed.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import demo
import distributed
import lora
import recipe
from alarm import ALARM_FILE, VISUAL_ALARM, SafetyAlarm, add_alarm_tokens

META_FILE = "videosafety_meta.json"  # the stage, its config and step, beside the weights of every checkpoint
TEMPLATE_FILE = "chat_template.jinja"  # what transformers reads: data.serving_template (alarm tokens inserted)
PLAIN_TEMPLATE_FILE = "videosafety_plain_chat_template.jinja"  # the model's own template, which build_prompt wraps
# the alarm tokens' embedding rows as trained (model.safetensors holds the alarm vectors there, for serving); with tied
# embeddings they are the LM head's rows too, so the project reloads them: a checkpoint is the model it trained
ROWS_FILE = "videosafety_alarm_rows.safetensors"
STRUCTURED_STAGES = ("cold_start", "grpo")  # their checkpoints answer in the structured format by default
MAX_NEW_TOKENS = 768  # completion length limit of GRPO's rollouts and of evaluation (the authors' GRPO value)


# -----------------------------------------------------------------------------
# Devices


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# The --dtype names load_model takes ("auto": the device's default_dtype).
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 on CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# -----------------------------------------------------------------------------
# Which parameters train: the LLM (decoder + LM head), the alarm vectors, the ATC heads; never the vision side


def _is_llm(name: str) -> bool:
    return ".language_model." in name or name.startswith("lm_head.")


def set_trainable(llm: VideoLLM, train_llm: bool, train_alarm: bool, train_heads: bool) -> None:
    """Vision encoder and projector: always frozen. LLM, alarm vectors, ATC heads: each on its own.
    A model with LoRA adapters (lora.wrap) trains only its adapters as the LLM's part; its base weights stay frozen."""
    adapters = lora.is_wrapped(llm.model)
    for n, p in llm.model.named_parameters():
        p.requires_grad_(train_llm and _is_llm(n) and (lora.is_adapter(n) or not adapters))
    if llm.alarm is not None:
        llm.alarm.vectors.requires_grad_(train_alarm)
        for p in list(llm.alarm.head_v.parameters()) + list(llm.alarm.head_t.parameters()):
            p.requires_grad_(train_heads)


LR_LLM, LR_ALARM, LR_HEADS = 1e-6, 1e-5, 1e-5  # the paper's learning rates: the stages' flags default to these
TOP_P = 0.95  # GRPO's nucleus at sampling temperature 1.0 (paper)


def param_groups(llm: VideoLLM, lr_llm: float, lr_alarm: float, lr_heads: float, weight_decay: float) -> list[dict]:
    """AdamW groups with separate learning rates (the paper's: LR_LLM, LR_ALARM, LR_HEADS).
    Only trainable tensors are included; a group with none is left out."""
    groups = [("llm", lr_llm, [p for p in llm.llm_parameters() if p.requires_grad])]
    if llm.alarm is not None:
        groups.append(("alarm", lr_alarm, [llm.alarm.vectors] if llm.alarm.vectors.requires_grad else []))
        heads = list(llm.alarm.head_v.parameters()) + list(llm.alarm.head_t.parameters())
        groups.append(("heads", lr_heads, [p for p in heads if p.requires_grad]))
    return [{"name": n, "params": ps, "lr": lr, "weight_decay": weight_decay} for n, lr, ps in groups if ps]


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
        run = getattr(self.model, distributed.BACKBONE, self.model.model)  # set by shard_model only
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


# -----------------------------------------------------------------------------
# Loading and saving


def checkpoint_meta(name_or_path: str) -> dict:
    """The videosafety_meta.json of a stage's checkpoint (its stage, config under "args", step); {} for anything
    else (a hub name, a plain model directory)."""
    meta_file = os.path.join(name_or_path, META_FILE)
    if not os.path.isfile(meta_file):
        return {}
    with open(meta_file) as f:
        return json.load(f)


STAGES = ("at_sft", "cold_start", "grpo")  # the stage scripts, whose --out folders are the next stage's --model


def check_model_path(name_or_path: str, what: str = "model") -> None:
    """A clear error for a model that cannot be a model, before from_pretrained gives a hub message for it:
    a path that does not exist, a file, a folder without config.json. A name that may be a hub id (org/name) and
    is not on disk is left to from_pretrained."""
    p = name_or_path
    if p in demo.TINY_MODELS:
        return
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "config.json")):
            return
        hint = ("it holds an unfinished run's snapshot in resume/: finish that run with --resume, or pass "
                f"{os.path.join(p, 'resume')}" if os.path.isdir(os.path.join(p, "resume")) else
                "a model folder is what a stage or save_pretrained writes")
        raise FileNotFoundError(f"{what} {p} is a folder without config.json, so not a model ({hint})")
    if os.path.exists(p):
        raise NotADirectoryError(f"{what} {p} is a file; a model is a folder with config.json (or a hub name)")
    looks_like_path = p.startswith(("/", ".", "~")) or p.count("/") >= 2 or p.endswith("/") or "\\" in p
    stage = os.path.basename(os.path.normpath(p))
    if looks_like_path or stage in STAGES:  # runs/at_sft, ckpt/grpo: a stage's --out, not a hub id
        hint = (f"; run {stage}.py first (its --out is {p}) or pass --model" if stage in STAGES else
                "; check the path")
        raise FileNotFoundError(f"{what} {p} not found: no such folder{hint}")
    if not _hub_id(p):  # "my model", "a..b": no hub could hold it, so say so rather than the hub's rules
        raise FileNotFoundError(f"{what} {p} not found: no such folder, and not a Hugging Face hub id either "
                                "(org/name); check the path")


def _hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


def load_model(name_or_path: str, *, device: str | None = None, dtype: torch.dtype | str | None = None,
               with_alarm: bool = True, trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> VideoLLM:
    """Load a video LLM by hub name, local path, stage checkpoint, or built-in tiny name.

    with_alarm: add alarm tokens if the checkpoint has none (a checkpoint saved with them keeps them
    either way; with_alarm=False on a plain model gives the base model as it is, for evaluation).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_model_path(name_or_path)
    if name_or_path in demo.TINY_MODELS:
        name_or_path = demo.tiny_model_path(name_or_path)
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(device)
    kw = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    processor = AutoProcessor.from_pretrained(name_or_path, **kw)
    processor.tokenizer.padding_side = "left"  # prompts are left-padded for generation
    plain_template = os.path.join(name_or_path, PLAIN_TEMPLATE_FILE)
    if os.path.isfile(plain_template):  # build_prompt inserts the alarm tokens itself: give it the plain template
        with open(plain_template) as f:
            processor.chat_template = processor.tokenizer.chat_template = f.read()
    elif VISUAL_ALARM in (processor.chat_template or ""):  # the serving template alone: build_prompt would add twice
        raise FileNotFoundError(f"{name_or_path}: its chat template inserts the alarm tokens (a served checkpoint) "
                                f"but {PLAIN_TEMPLATE_FILE} is missing (re-saved without it?); copy it back from the "
                                "checkpoint the stage wrote")
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **kw).to(device)
    meta = checkpoint_meta(name_or_path)
    alarm = None
    has_saved_alarm = os.path.isfile(os.path.join(name_or_path, ALARM_FILE))
    if has_saved_alarm or with_alarm:
        alarm = add_alarm_tokens(model, processor.tokenizer)  # ids come back the same: they were saved
        if has_saved_alarm:
            alarm.load_state(name_or_path)
        alarm.to(device)
    llm = VideoLLM(model=model, processor=processor, alarm=alarm, source=name_or_path, meta=meta)
    if has_saved_alarm:  # a checkpoint written before `servable` existed is converted here (the next save writes it)
        servable(llm)
        rows = os.path.join(name_or_path, ROWS_FILE)
        if os.path.isfile(rows):  # the rows the run trained with, not the served vectors
            from safetensors.torch import load_file

            restore_rows(llm, load_file(rows)["rows"])
    return llm


def servable(llm: VideoLLM, state_dict: dict | None = None) -> torch.Tensor | None:
    """Make the weights about to be saved serve as they are in plain transformers (no forward hook): the alarm
    vectors go into the alarm tokens' embedding rows (of the live model, or of the gathered `state_dict` when
    sharded), and generation_config gets the decoding eval uses (greedy, no repetition penalty, eval's completion
    limit) with the tokens `generate` bans as suppress_tokens. Returns the rows it overwrote (None without alarm):
    save_checkpoint puts them back into the live model and writes them beside the weights (ROWS_FILE), so saving
    never changes the model being trained and loading gives it back (with tied embeddings those rows are the LM
    head's too, inside every log-softmax)."""
    old = None
    if llm.alarm is not None:
        emb = llm.model.get_input_embeddings().weight
        rows = [llm.alarm.visual_id, llm.alarm.textual_id]
        with torch.no_grad():
            if state_dict is None:
                w = emb
            else:
                w = state_dict[next(n for n, p in llm.model.named_parameters() if p is emb)]
            old = w[rows].clone()
            w[rows] = llm.alarm.vectors.detach().to(w.device, w.dtype)
    gc = llm.model.generation_config
    gc.do_sample, gc.repetition_penalty, gc.temperature, gc.top_p, gc.top_k = False, 1.0, None, None, None
    gc.max_new_tokens = MAX_NEW_TOKENS  # else plain generate stops at transformers' 20 tokens, inside <think>
    gc.eos_token_id, gc.pad_token_id = llm.eot_id, llm.tokenizer.pad_token_id
    gc.suppress_tokens = banned_ids(llm) or None
    return old


def restore_rows(llm: VideoLLM, old: torch.Tensor) -> None:
    """The alarm tokens' embedding rows set back to `old` (what `servable` overwrote, or a checkpoint's ROWS_FILE)."""
    emb = llm.model.get_input_embeddings().weight
    with torch.no_grad():
        emb[[llm.alarm.visual_id, llm.alarm.textual_id]] = old.to(emb.device, emb.dtype)


@contextlib.contextmanager
def served_video_sampling(processor, fps: float, max_frames: int):
    """While the processor is saved: its video processor samples a video path's frames itself, at the fps and frame
    cap the checkpoint was trained with (data.served_sampling). The project picks the frames by the same rule
    (data.frame_sampler) in data.read_video and hands the processor those (do_sample_frames off), so the setting
    is for serving only and is undone after the save: a plain transformers user gets the project's frames."""
    vp = getattr(processor, "video_processor", None)
    served = data.served_sampling(fps, max_frames)
    old = {k: getattr(vp, k, None) for k in served}
    try:
        if vp is not None:
            for k, v in served.items():
                setattr(vp, k, v)
        yield
    finally:
        if vp is not None:
            for k, v in old.items():
                setattr(vp, k, v)


def save_checkpoint(llm: VideoLLM, directory: str, meta: dict | None = None) -> None:
    """A directory transformers can load (safetensors weights, tokenizer and processor with the
    alarm tokens) plus alarm.safetensors (vectors + heads) and videosafety_meta.json (config, step).

    Atomic: files are written to a temporary folder first, then each is renamed into place, the
    metadata last, so a crash mid-save never leaves a mix that looks complete.

    Sharded (FSDP2): every rank must call it; the full weights are gathered to rank 0's CPU and rank 0 writes
    the same ordinary directory, loadable in one process without torchrun.

    With LoRA adapters (one process only): the adapters merged into a copy of the weights (lora.merged_state_dict),
    so the directory is the same plain model, with no adapter tensors; the live model keeps its adapters."""
    sharded = distributed.is_sharded(llm)
    state_dict = distributed.full_state_dict(llm) if sharded else None  # a collective: all ranks take part
    if lora.is_wrapped(llm.model):
        state_dict = lora.merged_state_dict(llm.model)
    if distributed.rank() == 0:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".saving-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        old = servable(llm, state_dict)
        try:
            llm.model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        finally:
            if old is not None and not sharded:  # (LoRA's merged state_dict shares the embedding with the live model;
                restore_rows(llm, old)             # the gathered one of a sharded model is a copy)
        if old is not None:
            from safetensors.torch import save_file

            save_file({"rows": old.detach().cpu().contiguous()}, os.path.join(tmp, ROWS_FILE))
        args = (meta or {}).get("args") or {}
        with served_video_sampling(llm.processor, args.get("fps", data.FPS), args.get("max_frames", data.MAX_FRAMES)):
            llm.processor.save_pretrained(tmp)
        plain = llm.processor.chat_template
        with open(os.path.join(tmp, PLAIN_TEMPLATE_FILE), "w") as f:
            f.write(plain)
        with open(os.path.join(tmp, TEMPLATE_FILE), "w") as f:
            stage = (meta or {}).get("stage")  # the prompt this checkpoint was trained with (recipe.py)
            p = recipe.prompt_kwargs(recipe.of_checkpoint(meta), stage) if stage in STRUCTURED_STAGES else {}
            f.write(data.serving_template(llm.processor, structured=p.get("structured", False),
                                          template=p.get("template", "paper")) if llm.alarm is not None else plain)
        if llm.alarm is not None:
            llm.alarm.save(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta or {}, f, indent=2, default=str)
        for name in sorted(os.listdir(tmp), key=lambda n: n == META_FILE):  # metadata last
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        os.rmdir(tmp)
    distributed.barrier()  # no rank goes on (or reads the directory) before it is complete


# -----------------------------------------------------------------------------
# Generation


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


def banned_ids(llm: VideoLLM) -> list[int]:
    """Tokens never generated: the alarm tokens, image / video placeholders (a forward over prompt ++
    completion would count them as visual tokens and fail when GRPO recomputes the log-probs), and the pad token
    (batches are right-padded with it; unless it is the end-of-turn token, which must stay reachable)."""
    ids = [llm.alarm.visual_id, llm.alarm.textual_id] if llm.alarm is not None else []
    ids += [i for i in (getattr(llm.model.config, k, None) for k in ("image_token_id", "video_token_id"))
            if i is not None]
    pad = llm.tokenizer.pad_token_id
    return ids + ([pad] if pad is not None and pad != llm.eot_id and pad not in ids else [])


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) mask of real completion tokens: everything up to and INCLUDING the first end-of-turn token
    (the model must learn to stop), nothing after it."""
    is_eos = completion == eos_id
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after


def completion_tokens(completion: torch.Tensor, eos_id: int) -> list[list[int]]:
    mask = completion_mask(completion, eos_id)
    return [row[m].tolist() for row, m in zip(completion, mask)]


@torch.no_grad()
def generate(llm: VideoLLM, batch: dict, *, max_new_tokens: int = MAX_NEW_TOKENS, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Generate from a left-padded prompt batch (data.collate). Eval mode, KV cache on (generating in train
    mode with gradient checkpointing silently turns the cache off). Alarm tokens and image/video
    placeholders are never generated. Decoding is exactly what the arguments say: extras a checkpoint's own
    generation_config may carry (Qwen-Instruct's repetition penalty, top-k) are switched off, as in sample_group.
    Each process generates on its own (no synced_gpus), so a model sharded with FSDP2 must be inside
    `with distributed.unsharded(llm):`.

    Returns (completion ids (B, L), padded with pad_token_id after the end-of-turn token, decoded texts).
    """
    distributed.check_gathered(llm, "generate")
    tok = llm.tokenizer
    sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else dict(do_sample=False)
    bad = [[i] for i in banned_ids(llm)]
    inputs = {k: batch[k] for k in batch["model_keys"]}
    with eval_mode(llm):
        out = llm.model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=llm.eot_id,
                                 pad_token_id=tok.pad_token_id, bad_words_ids=bad or None, synced_gpus=False,
                                 repetition_penalty=1.0, **sample)
    completion = out[:, inputs["input_ids"].shape[1]:]  # (B, L)
    return completion, tok.batch_decode(completion_tokens(completion, llm.eot_id), skip_special_tokens=True)


# -----------------------------------------------------------------------------
# Log-probabilities of completions (GRPO's ratio and KL)


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


def completion_logprobs(llm: VideoLLM, batch: dict, completion: torch.Tensor, mask: torch.Tensor, *,
                        chunk: int = 1024) -> torch.Tensor:
    """log π(o_t | prompt, o_<t) of each completion token: (B, L) fp32, 0 where `mask` is 0.

    batch: the left-padded prompt batch (data.collate, with_target=False) the completions were sampled from;
    completion (B, L): right-padded ids (model.generate); mask (B, L): model.completion_mask.
    The sequence is prompt ++ completion (`prompt_and_completion`); the visual inputs (pixels, or the features
    of rollout.encode_videos, which skip the vision encoder) are passed as they are, and Qwen's 3-D positions are
    recomputed from input_ids (a training forward never reuses the rope_deltas that generation cached). The
    backbone runs once; the LM head runs only on the L positions that predict completion tokens, `chunk` rows at a
    time, each chunk recomputed in backward (checkpoint), so no (B, T, vocab) logits exist and at most
    (chunk, vocab) of them at once. Gradients flow iff grad is enabled.
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
