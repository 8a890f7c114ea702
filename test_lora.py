"""lora.py with the stages (--lora): one SFT step moves only the adapters, the alarm vectors and the ATC heads; the
saved checkpoint is a plain model with the adapters merged in, equal in its outputs to the wrapped model; a
snapshot resumes to the same adapters and base; without peft, one line; at_sft.py --lora end to end."""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import at_sft
import cli
import data
import lora
import model as M
import training as T
from alarm import at_sft_loss

pytest.importorskip("peft")

TINY = "tiny-qwen2.5-vl"  # its vision blocks also have gate/up/down projections: they must get no adapter


@pytest.fixture(scope="module")
def stepped(mixed_records):
    """A tiny model wrapped with --lora's defaults, its adapters, alarm and heads given one AdamW step of the
    AT-SFT loss; with the weights before the step and the batch."""
    llm = M.load_model(TINY, device="cpu", dtype=torch.float32)
    args = at_sft.get_args(["--lora", "--lora-dropout", "0"])
    T.apply_lora(llm, args)
    before = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    before_alarm = {n: p.detach().clone() for n, p in llm.alarm.named_parameters()}
    M.set_trainable(llm, train_llm=True, train_alarm=True, train_heads=True)
    opt = torch.optim.AdamW(M.param_groups(llm, 1e-3, 1e-3, 1e-3, 0.0))
    batch = data.collate(llm, mixed_records, structured=False, with_target=True)
    out = llm.forward(batch)
    loss, _ = at_sft_loss(out["lm_loss"], out["logit_v"], out["logit_t"], batch["video_label"], batch["text_label"])
    loss.backward()
    opt.step()
    llm.model.eval()
    return llm, before, before_alarm, batch


def outputs(llm, batch):
    with torch.no_grad():
        out = llm.forward(batch)
        return llm.model.lm_head(out["hidden"]), out["logit_v"], out["logit_t"]


def test_adapters_only_inside_the_language_model(stepped):
    llm = stepped[0]
    layers = lora.lora_layers(llm.model)
    n_layers = llm.model.config.text_config.num_hidden_layers
    assert len(layers) == n_layers * len(lora.TARGETS)
    assert all(".language_model." in n and n.rsplit(".", 1)[1] in lora.TARGETS for n in layers)
    assert any("visual" in n and n.endswith("gate_proj") for n, _ in llm.model.named_modules())  # there, untouched


def test_one_step_moves_only_adapters_alarm_and_heads(stepped):
    llm, before, before_alarm, _ = stepped
    trainable = {n for n, p in llm.model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter(n) for n in trainable)
    for n, p in llm.model.named_parameters():
        if lora.is_adapter(n):
            if ".lora_B." in n:  # B starts at 0 (W' = W at step 0) and the step moved every one
                assert not torch.equal(p, before[n]) and torch.count_nonzero(before[n]) == 0
        else:  # base LLM weights, LM head, embeddings, vision encoder: bitwise as they were
            assert torch.equal(p, before[n]), n
    for n, p in llm.alarm.named_parameters():  # vectors and both heads train in full
        assert not torch.equal(p, before_alarm[n]), n


def test_saved_checkpoint_is_merged_plain_and_equal(stepped, tmp_path):
    llm, _, _, batch = stepped
    expected = outputs(llm, batch)
    out = str(tmp_path / "ckpt")
    M.save_checkpoint(llm, out, meta={"stage": "at_sft"})
    assert lora.is_wrapped(llm.model)  # the live model keeps its adapters
    keys = load_file(os.path.join(out, "model.safetensors")).keys()
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    plain = M.load_model(out, device="cpu", dtype=torch.float32)
    assert not lora.is_wrapped(plain.model)
    again = str(tmp_path / "again")  # the plain model saved without adapters writes the very same tensors
    M.save_checkpoint(plain, again, meta={"stage": "at_sft"})
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = outputs(plain, batch)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_snapshot_resumes_adapters_and_base(stepped, tmp_path):
    llm, before, _, batch = stepped
    expected = outputs(llm, batch)
    args = at_sft.get_args(["--lora", "--lora-dropout", "0"])
    opt = torch.optim.AdamW(M.param_groups(llm, 1e-3, 1e-3, 1e-3, 0.0))
    sched = T.cosine_schedule(opt, 4)
    snap = str(tmp_path / "resume")
    T.save_train_state(snap, llm, opt, sched, {"phase": "at_sft", "step": 1})

    back = T.load_for_training(snap, "cpu")
    T.apply_lora(back, args, snap)
    live = dict(llm.model.named_parameters())
    emb = back.model.get_input_embeddings().weight
    for n, p in back.model.named_parameters():
        if p is emb:  # the alarm rows too: the served file has the vectors there, the project reloads the rows it had
            assert torch.equal(p, before[n])
        elif lora.is_adapter(n):
            assert torch.equal(p, live[n]), n  # the adapters bitwise
        else:  # the base: merged minus (α/r)·BA, back to the frozen start up to fp32 rounding
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    M.set_trainable(back, train_llm=True, train_alarm=True, train_heads=True)
    opt2 = torch.optim.AdamW(M.param_groups(back, 1e-3, 1e-3, 1e-3, 0.0))
    assert T.load_train_state(snap, opt2, T.cosine_schedule(opt2, 4), back)["step"] == 1
    back.model.eval()
    for a, b in zip(expected, outputs(back, batch)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)

    plain = T.load_for_training(snap, "cpu")  # the same snapshot resumed without --lora: refused
    with pytest.raises(T.TrainingError, match="--lora"):
        T.apply_lora(plain, at_sft.get_args([]), snap)


def test_lora_without_peft_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        cli.run_cli(lambda: at_sft.main(["--lora", "--out", out]))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install peft" in err
    assert not os.path.exists(out)  # refused before the output folder, the data or the model


def test_at_sft_lora_end_to_end(demo_dir, tmp_path):
    out = str(tmp_path / "at_sft")
    at_sft.main(["--data", f"{demo_dir}/at_sft.jsonl", "--out", out, "--lora", "--max-steps", "1", "--batch-size",
                 "3", "--grad-accum", "1", "--lr-llm", "3e-3", "--eval-records", "0", "--device", "cpu"])
    start = M.load_model("tiny-videollama3", device="cpu", dtype=torch.float32)
    w = load_file(os.path.join(out, "model.safetensors"))
    assert not [k for k in w if "lora" in k or "base_layer" in k]
    got = M.load_model(out, device="cpu")
    first = dict(start.model.named_parameters())
    moved = set()
    for n, p in got.model.named_parameters():
        if p is got.model.get_input_embeddings().weight:
            continue  # its alarm rows hold the trained alarm vectors (model.servable)
        if torch.equal(p, first[n]):
            continue
        moved.add(n)
    assert moved and all(".language_model." in n and n.rsplit(".", 2)[1] in lora.TARGETS for n in moved)
    assert not torch.equal(got.alarm.head_v.weight, start.alarm.head_v.weight)  # the heads trained in full


def test_lora_refused_under_torchrun():
    lora.check(False, 8)  # without --lora nothing is asked
    with pytest.raises(lora.LoraError, match="not supported with torchrun / FSDP"):
        lora.check(True, 2)


def test_grpo_lora_end_to_end(demo_dir, tmp_path):
    import grpo
    from conftest import GRPO

    out = str(tmp_path / "grpo")
    grpo.main(["--data", f"{demo_dir}/grpo.jsonl", *GRPO, "--max-steps", "1", "--out", out, "--lora"])
    w = load_file(os.path.join(out, "model.safetensors"))
    assert not [k for k in w if "lora" in k or "base_layer" in k]
    assert not lora.is_wrapped(M.load_model(out, device="cpu").model)
