"""The `moepatch` lm-eval model scores requests as lm-eval's HFLM does (without a patch it is HFLM
plus an attention mask), while computing logits only where a continuation is scored."""

import json

import pytest
import torch

import moepatch
from moepatch.eval.tasks import embedded_model_path, task_data_path


@pytest.fixture(scope="module")
def models():
    import transformers
    from lm_eval.models.huggingface import HFLM

    from moepatch.eval.lm import MoePatchLM

    path = embedded_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = MoePatchLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=128, capacity_factor=None)
    moepatch.remove(model)
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=128)
    return ours, plain


def _greedy_request(lm, context, steps=3):
    """(context, the model's own greedy continuation): a request whose greedy flag is True.  The
    context ends without whitespace, which lm-eval would move into the continuation."""
    context = context.rstrip()[-200:]
    ids = lm.tok_encode(context)
    for _ in range(steps):
        ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    return context, lm.tokenizer.decode(ids[-steps:])


def _requests(kind, n, lm=None):
    from lm_eval.api.instance import Instance

    if kind == "loglikelihood":
        rows = [json.loads(line) for line in open(task_data_path("stdlib_cloze"))][:n]
        args = [(r["context"], c) for r in rows for c in r["choices"]]
        args += [_greedy_request(lm, r["context"]) for r in rows]
    else:
        args = [(json.loads(line)["text"][:1500],) for line in open(task_data_path("stdlib_ppl"))][:n]
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def test_loglikelihoods_and_greedy_flags_equal_hflm(models):
    ours, plain = models
    reqs = _requests("loglikelihood", 6, plain)
    got, want = ours.loglikelihood(reqs), plain.loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in want]
    assert any(g for _, g in want)  # some continuation is the greedy one: the flag is exercised
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in want]),
                               rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_rolling_loglikelihoods_equal_hflm(models):
    ours, plain = models
    reqs = _requests("loglikelihood_rolling", 5)  # 1500 characters: several 128-token windows each
    torch.testing.assert_close(torch.tensor(ours.loglikelihood_rolling(reqs)),
                               torch.tensor(plain.loglikelihood_rolling(reqs)), rtol=1e-5, atol=1e-3)


def test_padding_is_masked_for_capacity(models):
    """A capped batch counts only real tokens: the patched model sees each request's own length."""
    ours, _ = models
    reqs = _requests("loglikelihood", 2, ours)
    with moepatch.patched(ours.model, capacity_factor=1.0) as handle:
        ours.loglikelihood(reqs)
        tokens = sum(r.tokens for r in handle.stats().records if r.layer == 0)
    real = sum(min(len(ours.tok_encode(c + x)), 129) - 1 for c, x in (r.args for r in reqs))
    assert tokens == real
