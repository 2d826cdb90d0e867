"""lm-eval plugin: makes ``lm_eval --model moepatch ...`` work in an unchanged lm-eval workflow.

lm-eval 0.4 has no entry point for external models, so ``moepatch install-lm-eval-plugin`` (run by
``make install``) writes a one-line ``.pth`` file that imports this module at interpreter start.
It lives outside the ``moepatch`` package and imports nothing heavy: it only wraps
``lm_eval.api.registry.get_model`` when lm-eval itself imports that module, so asking for the
model name ``moepatch`` first imports ``moepatch.eval.lm``, which registers it.
"""

import importlib.abc
import importlib.machinery
import sys

_REGISTRY = "lm_eval.api.registry"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        original = module.get_model

        def get_model(model_name):
            if model_name == "moepatch":
                import moepatch.eval.lm  # noqa: F401  (registers the model class)
            return original(model_name)

        get_model.__doc__ = original.__doc__
        module.get_model = get_model


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
