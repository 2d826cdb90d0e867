"""lm-eval integration: the ``moepatch`` model (HFLM plus a capacity-aware patch), registered on import; use
it as ``simple_evaluate(model="moepatch", model_args="pretrained=DIR,capacity_factor=1.5")``, ``lm_eval --model
moepatch`` or ``moepatch lm-eval``.  B requests in a batch, L padded length, N scored positions, D hidden, V vocab.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..patch import core as patch_core
from ..routing.config import config_fields


def null_to_none(value):
    # lm-eval's model_args parser leaves "None" as a string.
    return None if isinstance(value, str) and value.lower() in ("none", "null", "inf") else value


def patch_arguments(model_args: dict) -> tuple[dict, dict]:
    """lm-eval's parsed ``model_args`` split into ``moepatch.apply``'s keyword arguments and the rest (HFLM's)."""
    names = set(config_fields())
    rest = dict(model_args)
    patch = {k: rest.pop(k) for k in list(rest) if k in names}
    patch["capacity_factor"] = null_to_none(patch.get("capacity_factor"))
    if "policy" in patch:
        patch["policy"] = null_to_none(patch["policy"])
    return patch, rest


@register_model("moepatch")
class MoePatchLM(HFLM):
    """HFLM whose model is patched with ``moepatch.apply`` (every apply argument can be a ``model_args`` key).

    Batches are built as HFLM builds them, but the padding goes to the model as an attention mask (so
    capacity counts only real tokens), logits are computed only where a continuation is scored, rolling
    windows skip the greedy check their callers discard, and tokenisations are cached across a sweep."""

    def __init__(self, pretrained, **kwargs):
        options, kwargs = patch_arguments(kwargs)
        # HFLM warns about a built model passed as ``pretrained``: moepatch's sweeps do it on purpose.
        logger = logging.getLogger("lm_eval.models.huggingface")
        level = logger.level
        if not isinstance(pretrained, str):
            logger.setLevel(logging.ERROR)
        try:
            super().__init__(pretrained=pretrained, **kwargs)
        finally:
            logger.setLevel(level)
        # Checked before apply, which resets the statistics: the probe's forward is not counted.
        self._split = _head_splits(self.model)  # the output head runs apart from the decoder
        self.handle = patch_core.apply(self.model, **options)
        self._encodings: dict = {}
        self._rolling = False

    def tok_encode(self, string, left_truncate_len=None, add_special_tokens=None):
        key = (string, left_truncate_len, add_special_tokens)
        enc = self._encodings.get(key)
        if enc is None:
            enc = self._encodings[key] = tuple(super().tok_encode(string, left_truncate_len, add_special_tokens))
        return list(enc)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)
        finally:
            self._rolling = False

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        bs = override_bs or (self.batch_size if isinstance(self.batch_size, int) else self._detect_batch_size())
        # HFLM's order: longest first, ties by the tokens themselves.
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1] + requests[i][2]),
                                                            tuple(requests[i][1] + requests[i][2])))
        out: list = [None] * len(requests)
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            for i, answer in zip(chunk, self._score_batch([requests[i] for i in chunk])):
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    @torch.no_grad()
    def _score_batch(self, chunk) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), greedy) for one right-padded batch of (key, context, continuation)."""
        inps = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
        B, L = len(inps), max(len(t) for t in inps)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids_BL = torch.full((B, L), pad, dtype=torch.long)
        mask_BL = torch.zeros((B, L), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, (toks, (_, _, cont)) in enumerate(zip(inps, chunk)):
            n, c = len(toks), len(cont)
            ids_BL[b, :n] = torch.tensor(toks)
            mask_BL[b, :n] = 1
            rows += [b] * c  # the logits at position p score token p + 1: positions n - c .. n - 1
            cols += range(n - c, n)
            targets += cont
        # No padding in the batch: no mask, so attention takes its causal fast path (the same tokens count).
        mask = None if bool(mask_BL.all()) else mask_BL.to(self.device)
        row_N, col_N = torch.tensor(rows), torch.tensor(cols)
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            hidden_ND = self._head_input(ids_BL.to(self.device), mask)[row_N, col_N]
            logp_N, greedy_N = _score_rows(self._head, hidden_ND, torch.tensor(targets, device=hidden_ND.device),
                                           greedy=not self._rolling)
        total_B = torch.zeros(B, dtype=torch.float64).index_add_(0, row_N, logp_N.double().cpu()).tolist()
        if self._rolling:  # loglikelihood_rolling sums the log-probabilities and discards the greedy check
            return [(t, False) for t in total_B]
        missed_B = torch.zeros(B).index_add_(0, row_N, (~greedy_N).float().cpu())
        return list(zip(total_B, (missed_B == 0).tolist()))

    def _head_input(self, ids_BL, mask_BL):
        """(B, L, D) what the output head reads, or (B, L, V) logits when the head cannot be split off."""
        if self._split:
            return self.model.get_decoder()(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        return self.model(input_ids=ids_BL, attention_mask=mask_BL).logits

    def _head(self, rows_ND):
        return self.model.get_output_embeddings()(rows_ND) if self._split else rows_ND


_ROWS = 256  # rows of logits per step: a (256, V) float32 block stays in cache while it is reduced


def _score_rows(head, rows_ND, target_N, greedy: bool):
    """log p(target) of each row (float32) and whether it is the argmax, ``_ROWS`` rows at a time."""
    logp_N = torch.empty(rows_ND.shape[0], dtype=torch.float32, device=rows_ND.device)
    greedy_N = torch.ones(rows_ND.shape[0], dtype=torch.bool, device=rows_ND.device)
    for s in range(0, rows_ND.shape[0], _ROWS):
        logits_RV = head(rows_ND[s:s + _ROWS]).float()
        t_R = target_N[s:s + _ROWS]
        logp_N[s:s + _ROWS] = logits_RV.gather(1, t_R[:, None]).squeeze(1) - logits_RV.logsumexp(-1)
        if greedy:
            greedy_N[s:s + _ROWS] = logits_RV.argmax(-1) == t_R
    return logp_N, greedy_N


@torch.no_grad()
def _head_splits(model) -> bool:
    """Whether the logits are exactly the output embedding of the decoder's output (no scaling or soft-capping
    after the head), checked on a few tokens."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or decoder is model or head is None:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device)[None] % int(model.config.vocab_size)
    return torch.equal(model(input_ids=ids).logits, head(decoder(input_ids=ids).last_hidden_state))
