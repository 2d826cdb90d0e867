"""The paper's main finding, asserted on the shipped embedded model (held-out stdlib text)."""

import json

import pytest
import torch

import moepatch
from moepatch.eval.tasks import embedded_model_path, task_data_path


@pytest.fixture(scope="module")
def shipped():
    import transformers

    path = embedded_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    docs = [json.loads(line)["text"] for line in open(task_data_path("stdlib_ppl"))][:48]
    enc = [tok(d).input_ids[:256] for d in docs]
    ids = torch.zeros(len(enc), max(map(len, enc)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return model, ids, mask


def _nll(model, ids, mask):
    """Mean next-token negative log-likelihood over the real tokens of a right-padded batch."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return -lp[mask[:, 1:].bool()].mean().item()


@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_score_drop_beats_random_and_order_and_reroute_expanded_lose_no_more(shipped, gamma):
    model, ids, mask = shipped
    base = _nll(model, ids, mask)
    loss = {}
    for name, opts in {"score": dict(policy="score"), "random": dict(policy="random"),
                       "order": dict(policy="order"), "reroute": dict(strategy="reroute"),
                       "expanded": dict(strategy="expanded")}.items():
        with moepatch.patched(model, capacity_factor=gamma, **opts) as h:
            loss[name] = _nll(model, ids, mask) - base
            assert h.stats().totals()["dropped_fraction"] > 0.05  # capacity really binds here
    assert 0 < loss["score"] < loss["random"] and loss["score"] < loss["order"], loss
    assert loss["reroute"] <= loss["score"] and loss["expanded"] <= loss["score"], loss


def test_no_capacity_equals_the_unpatched_model(shipped):
    model, ids, mask = shipped
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with moepatch.patched(model, capacity_factor=None):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


def test_lm_eval_model_without_capacity_is_exact(tmp_path):
    """Through lm-eval: the `moepatch` model at γ=None scores exactly as with the patch removed."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moepatch.eval.lm import MoePatchLM
    from moepatch.eval.tasks import write_task_configs

    write_task_configs(str(tmp_path))
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = MoePatchLM(pretrained=str(embedded_model_path()), device="cpu", batch_size=8, capacity_factor=None)

    def run():
        res = simple_evaluate(model=lm, tasks=["stdlib_cloze"], limit=16, task_manager=tm, bootstrap_iters=0,
                              log_samples=True, verbosity="ERROR")
        return [s["resps"] for s in res["samples"]["stdlib_cloze"]], res["results"]["stdlib_cloze"]["acc,none"]

    patched_resps, patched_acc = run()
    assert len(moepatch.stats(lm.model).records) > 0
    moepatch.remove(lm.model)
    plain_resps, plain_acc = run()
    assert patched_resps == plain_resps and patched_acc == plain_acc
    moepatch.apply(lm.model, capacity_factor=1.0)
    capped_resps, _ = run()
    assert capped_resps != plain_resps
