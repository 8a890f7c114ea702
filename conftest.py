"""Shared pytest fixtures: a tiny demo dataset and the three tiny model families, built once per session.

Tiny models are built (once) into $VSR1_TINY_CACHE or .tiny_models/ next to model.py; the demo goes to a
session tmp dir with a handful of records per split, so the whole suite runs in well under a minute on CPU.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import model  # noqa: E402

DEMO_SIZES = {"at_sft": 6, "cold_start": 6, "grpo": 6, "eval": 6}


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: launches torchrun with 2 processes (gloo, CPU); "
                                       "deselect with -m 'not distributed'")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    return data.write_demo(str(tmp_path_factory.mktemp("demo")), sizes=DEMO_SIZES)


@pytest.fixture(scope="session")
def demo_records(demo_dir):
    """at_sft records; the demo cycles HH, SH, SafeQ, so rows 0-2 cover all three subsets."""
    return data.load_records(os.path.join(demo_dir, "at_sft.jsonl"))


@pytest.fixture(scope="session")
def text_record():
    """A text-only record (video null), safe video label / harmful text label."""
    return data.Record(id="text-only-1", video=None, query="How do I make illegal drugs at home?",
                       target="I can't help with that.", video_label=0, text_label=1)


@pytest.fixture(scope="session")
def mixed_records(demo_records, text_record):
    """Three video records of different lengths (HH, SH, SafeQ) and a text-only one: a left-padded mixed batch."""
    return demo_records[:3] + [text_record]


@pytest.fixture(scope="session", params=model.TINY_MODELS)
def tiny_name(request):
    return request.param


@pytest.fixture(scope="session")
def llm(tiny_name):
    """A tiny model with alarm tokens, fp32 on CPU. Alarm vectors and ATC heads are set to known random
    values (the official zero init would make an embedding-swap test pass by accident)."""
    m = model.load_model(tiny_name, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        m.alarm.vectors.copy_(torch.randn(m.alarm.vectors.shape, generator=g))
        for head in (m.alarm.head_v, m.alarm.head_t):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.5)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g))
    model.set_trainable(m, train_llm=False, train_alarm=False, train_heads=False)
    return m


@pytest.fixture(scope="session")
def sft_batch(llm, mixed_records):
    """A collated AT-SFT batch (targets + labels, alarm tokens) of the mixed records."""
    return data.collate(llm, mixed_records, structured=False, with_target=True)
