"""lm-eval integration: the ``moepatch`` model (HFLM plus a capacity-aware patch).

    import moepatch.eval.lm                      # registers "moepatch" with lm-eval
    lm_eval.simple_evaluate(model="moepatch", model_args="pretrained=DIR,capacity_factor=1.5,strategy=drop", ...)

or on the command line through ``moepatch lm-eval --model moepatch --model_args ...`` (lm-eval's
own CLI with the model registered; lm-eval 0.4 has no plugin entry point for external models).
"""

from __future__ import annotations

import inspect

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import moepatch
from moepatch.routing.config import config_fields


def _none(value):
    # lm-eval's model_args parser leaves "None" as a string.
    return None if isinstance(value, str) and value.lower() in ("none", "null", "inf") else value


@register_model("moepatch")
class MoePatchLM(HFLM):
    """HFLM whose model is patched with ``moepatch.apply`` after loading.

    Every ``moepatch.apply`` argument can be given in ``model_args``; the rest go to HFLM.  Padding
    is passed to the model as an attention mask, so capacity counts only the real tokens of a
    batch (lm-eval itself feeds causal models right-padded batches without a mask).
    """

    def __init__(self, pretrained, capacity_factor=None, strategy="drop", policy=None, **kwargs):
        names = set(config_fields()) - {"capacity_factor", "strategy", "policy"}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        super().__init__(pretrained=pretrained, **kwargs)
        self.handle = moepatch.apply(self.model, capacity_factor=_none(capacity_factor), strategy=strategy,
                                     policy=_none(policy), **options)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.backend != "causal" or attn_mask is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        mask = _right_padding_mask(inps)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(inps, attention_mask=mask).logits


def _right_padding_mask(inps: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of lm-eval's right-padded loglikelihood batch.

    lm-eval 0.4 builds the batch in ``HFLM._loglikelihood_tokens`` and keeps the real lengths in
    its local ``inplens``; they are read from the caller's frame.  When they are not there (another
    lm-eval version or caller), no mask is given and padding counts toward capacity.
    """
    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back if frame and frame.f_back else None
        lens = caller.f_locals.get("inplens") if caller is not None else None
    finally:
        del frame
    if not isinstance(lens, list) or len(lens) != inps.shape[0]:
        return None
    lens_B = torch.tensor(lens, device=inps.device)
    return (torch.arange(inps.shape[1], device=inps.device)[None, :] < lens_B[:, None]).long()
