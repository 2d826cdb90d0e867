"""Loading a model for evaluation: aliases, local paths, hub ids, and clear errors when offline."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MoePatchError
from .presets import MODEL_ALIASES

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(MoePatchError, OSError):
    """A model that could not be found locally nor fetched."""


def resolve_model(name: str | None) -> str:
    """The embedded model when ``name`` is None, an alias's hub id, or ``name`` itself."""
    if name is None:
        from .tasks import embedded_model_path

        path = embedded_model_path()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the embedded model is missing at {path}; reinstall moepatch or train it with "
                                 "recipes/embedded (see its README)")
        return str(path)
    return MODEL_ALIASES.get(name, name)


def load_model(name: str | None, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer, resolved name) for ``moepatch eval`` / ``stats``.

    Raises:
        ModelLoadError: says what was tried and how to point at a local copy.
    """
    import torch
    import transformers

    if dtype not in DTYPES:
        raise MoePatchError(f"--dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    target = resolve_model(name)
    is_local = Path(target).is_dir()
    if not is_local and (target.startswith((".", "/")) or os.sep in target and target.count("/") > 1):
        raise ModelLoadError(f"model path {target!r} does not exist; give a local model directory, a hub id "
                             f"or one of the aliases: {', '.join(MODEL_ALIASES)}")
    on_gpu = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    # "auto": the checkpoint's dtype on GPUs; float32 on the CPU, where bf16 matmuls are many times slower.
    if dtype == "auto":
        kwargs = {"dtype": "auto" if on_gpu else torch.float32}
    else:
        kwargs = {"dtype": getattr(torch, dtype)}
    if device == "auto" and on_gpu:
        kwargs["device_map"] = "auto"
    try:
        tok = transformers.AutoTokenizer.from_pretrained(target)
        model = transformers.AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        alias = f" (alias {name!r})" if name in MODEL_ALIASES else ""
        raise ModelLoadError(
            f"could not load {target!r}{alias}: tried a local directory (none at that path) and the Hugging Face "
            f"hub cache{' in offline mode (HF_HUB_OFFLINE=1)' if offline else ''}, which has no copy. "
            f"Download it on a machine with network access (huggingface-cli download {target} --local-dir DIR) "
            f"and pass --model DIR.  ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if device not in ("auto",) and "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tok, target
