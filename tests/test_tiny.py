"""moepatch.tiny: a tiny model of every MoE causal-LM type of the installed transformers (or the reason
why not, in UNBUILDABLE) builds from its config, runs a forward with finite logits and has experts."""

import functools
import re
import time

import pytest
import torch
import transformers
from packaging.version import Version

from moepatch import tiny


@functools.cache
def _run(model_type: str) -> tuple[int, bool, float]:
    """(experts modules, finite logits, build seconds) of the tiny model, built once per type."""
    start = time.perf_counter()
    model = tiny.tiny_model(model_type)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(torch.randint(3, 100, (2, 8))).logits
    return len(tiny.experts_modules(model)), bool(torch.isfinite(logits).all()), seconds


def _builds(model_type: str) -> bool:
    experts, finite, seconds = _run(model_type)
    # A generous bound: the first build of a run also pays transformers' lazy imports.
    return experts > 0 and finite and seconds < 10


@pytest.mark.parametrize("model_type", tiny.moe_model_types())
def test_every_type_builds_or_says_why_not(model_type):
    if model_type in tiny.UNBUILDABLE:
        with pytest.raises(ValueError, match=re.escape(tiny.UNBUILDABLE[model_type])):
            tiny.tiny_config(model_type)
    else:
        assert _builds(model_type), _run(model_type)


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.25"), reason="the count is for transformers 5.25")
def test_most_types_build():
    assert len(tiny.moe_model_types()) >= 62
    assert sum(t not in tiny.UNBUILDABLE and _builds(t) for t in tiny.moe_model_types()) >= 43


def test_unbuildable_and_unknown_types_raise(monkeypatch):
    monkeypatch.setitem(tiny.UNBUILDABLE, "zaya", "a reason of the table")
    with pytest.raises(ValueError, match="a reason of the table"):
        tiny.tiny_config("zaya")
    with pytest.raises(ValueError, match="no tiny config for 'llama'"):
        tiny.tiny_config("llama")


def test_generic_config_is_tiny():
    """The derived config of a multi-kind type: kinds of layers kept, sizes shrunk, special ids in the vocab."""
    cfg = tiny.tiny_config("qwen3_next")
    assert set(cfg.layer_types) == {"linear_attention", "full_attention"}
    assert cfg.num_hidden_layers == len(cfg.layer_types) == 4
    assert (cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (64, 8, 2, 128)
    assert tiny.tiny_config("qwen3_next", num_experts=4).num_experts == 4
    assert tiny.tiny_config("kimi_linear").pad_token_id < 128
