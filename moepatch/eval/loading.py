"""Loading a model and its evaluation data (aliases, local paths, hub ids) with clear errors offline; what the
user can fix is checked before any weight is loaded (:func:`check_model`, :func:`build_tasks`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from ..errors import MoePatchError, UnsupportedModelError
from ..patch.registry import supported_model_types
from .presets import MODEL_ALIASES

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(MoePatchError, OSError):
    """A model that could not be found locally nor fetched."""


class DatasetUnavailableError(MoePatchError, OSError):
    """Datasets of the requested tasks that are neither in the local cache nor reachable."""


_UNREACHABLE: list[str] = []  # why the hub was found unreachable (see use_cache_if_hub_unreachable)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _hub_state() -> str:
    if _UNREACHABLE:
        return f"the hub cannot be reached ({_UNREACHABLE[0]}), so only the local caches are used"
    return "the hub is offline (HF_HUB_OFFLINE=1)"


def use_cache_if_hub_unreachable(timeout_s: float = 3.0) -> None:
    """With downloads allowed but no route to the hub, switch this process to the local caches at once
    (every hub request would otherwise retry for tens of seconds); call before huggingface_hub is imported."""
    import socket
    from urllib.parse import urlparse

    _UNREACHABLE.clear()  # decided afresh on every call (a long-lived process may run several commands)
    if offline():
        return
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        _UNREACHABLE.append(f"{host}:{port}: {exc.strerror or type(exc).__name__}")
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


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


def _download_hint(target: str) -> str:
    allow = "" if _UNREACHABLE else ", or allow downloads with HF_HUB_OFFLINE=0"
    return (f"download it where there is network (`hf download {target} --local-dir DIR`, huggingface_hub's CLI) "
            f"and pass --model DIR{allow}")


def check_model(name: str | None, need_moe: bool = True, aliases: bool = True):
    """The resolved model location and its config, no weight loaded (``aliases``: MODEL_ALIASES names stand for
    hub ids).  Raises ModelLoadError (what was tried) or, with ``need_moe``, UnsupportedModelError."""
    import transformers

    target = resolve_model(name) if aliases or name is None else name
    alias = f" (alias {name!r})" if aliases and name in MODEL_ALIASES else ""
    local = Path(target)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{target!r} is a directory without config.json; give a model directory "
                                 "(save_pretrained layout), a hub id or one of the aliases: "
                                 f"{', '.join(MODEL_ALIASES)}")
    elif target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise ModelLoadError(f"model path {target!r} does not exist; give a local model directory, a hub id "
                             f"or one of the aliases: {', '.join(MODEL_ALIASES)}")
    elif offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(target, "config.json"), str):
            raise ModelLoadError(f"{target!r}{alias} is not a local directory and not in the Hugging Face cache, "
                                 f"and {_hub_state()}: {_download_hint(target)}")
    try:
        config = transformers.AutoConfig.from_pretrained(target)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config of {target!r}{alias}"
                             f"{' (' + _hub_state() + ')' if offline() else ''}: {str(exc).splitlines()[0]}; "
                             f"{_download_hint(target)}") from exc
    if need_moe:
        supported = supported_model_types()
        if config.model_type not in supported:
            raise UnsupportedModelError(f"{target!r} is a {config.model_type!r} model, not a Mixture-of-Experts "
                                        f"family moepatch patches; supported model types: {', '.join(supported)}")
    return target, config


def load_model(name: str | None, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer, resolved name) for ``moepatch eval`` / ``stats`` (after :func:`check_model`);
    ModelLoadError says what was tried and how to point at a local copy."""
    import transformers

    target = resolve_model(name)
    on_gpu = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    # "auto": the checkpoint's dtype on GPUs; float32 on the CPU, where bf16 matmuls are many times slower.
    kwargs = {"dtype": ("auto" if on_gpu else torch.float32) if dtype == "auto" else getattr(torch, dtype)}
    if device == "auto" and on_gpu:
        kwargs["device_map"] = "auto"
    if not sys.stderr.isatty():  # the weight-loading bar is the phase's one bar on a terminal, noise in a log
        transformers.utils.logging.disable_progress_bar()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(target)
        model = transformers.AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except OSError as exc:
        alias = f" (alias {name!r})" if name in MODEL_ALIASES else ""
        raise ModelLoadError(
            f"could not load {target!r}{alias}: tried a local directory and the Hugging Face hub cache"
            f"{' (' + _hub_state() + ')' if offline() else ''}; {_download_hint(target)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if device != "auto" and "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tok, target


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` of a present GPU."""
    if device in ("auto", "cpu"):
        return
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        n = torch.cuda.device_count()
        index = int(device[5:]) if ":" in device else 0
        if index >= n:
            raise MoePatchError(f"--device {device!r}: this machine has {n} CUDA GPU(s); accepted: auto, cpu"
                                + (f", cuda, cuda:0 .. cuda:{n - 1}" if n else ""))
        return
    raise MoePatchError(f"--device {device!r} is not valid; accepted: auto, cpu, cuda, cuda:N")


def build_tasks(task_manager, names: list[str]) -> dict:
    """{name: lm-eval's ``TaskManager.load(name)``}, each task's dataset loaded (from the local cache when
    offline); DatasetUnavailableError names every dataset that could not be loaded and what to do."""
    loaded, missing = {}, []
    for name in names:
        try:
            loaded[name] = task_manager.load(name)
        except (OSError, ValueError) as exc:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            cfg = getattr(task_manager.task_index.get(name), "cfg", None) or {}
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            quoted = re.search(r"'([^' ]+/[^' ]+)'", text)  # a group's task names no dataset: the error does
            dataset = cfg.get("dataset_path") or (quoted.group(1) if quoted else "?")
            if cfg.get("dataset_name"):
                dataset += f" {cfg['dataset_name']}"
            # Offline, the reason is the same for every dataset; otherwise each one's error is kept.
            missing.append(f"{name} ({dataset})" if offline() else f"{name} ({dataset}: {text})")
    if missing:
        what = ", ".join(missing)
        if offline() or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
            state = _hub_state() if _UNREACHABLE else "the hub is offline (HF_DATASETS_OFFLINE=1)"
            allow = "" if _UNREACHABLE else ", or allow downloads with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0"
            hint = (f"they are not in the local datasets cache and {state}: load them once where there is network "
                    "(`python -c \"import datasets; datasets.load_dataset('NAME')\"`) and copy ~/.cache/huggingface"
                    f"{allow}")
        else:
            hint = "check the network and the dataset names"
        raise DatasetUnavailableError(f"the data of {len(missing)} of {len(names)} task(s) cannot be loaded "
                                      f"({what}); {hint}")
    return loaded
