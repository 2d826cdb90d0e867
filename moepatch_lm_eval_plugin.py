"""lm-eval plugin: makes ``lm_eval --model moepatch --tasks stdlib_cloze ...`` work in an unchanged lm-eval workflow.

lm-eval 0.4 has no entry point for external models or task directories, so ``moepatch
install-lm-eval-plugin`` (run by ``make install``) writes a one-line ``.pth`` file that imports
this module at interpreter start.  It lives outside the ``moepatch`` package and imports nothing
heavy: it only wraps two lm-eval modules when lm-eval itself imports them:

- ``lm_eval.api.registry.get_model``: asking for the model name ``moepatch`` first imports
  ``moepatch.eval.lm``, which registers it;
- ``lm_eval.tasks.manager.TaskManager``: every task manager that includes lm-eval's own tasks
  also includes moepatch's (``moepatch.eval.tasks.task_config_dir``), so the shipped offline
  tasks are found without ``--include_path``.
"""

import importlib.abc
import importlib.machinery
import sys


def _wrap_registry(module):
    original = module.get_model

    def get_model(model_name):
        if model_name == "moepatch":
            import moepatch.eval.lm  # noqa: F401  (registers the model class)
        return original(model_name)

    get_model.__doc__ = original.__doc__
    module.get_model = get_model


def _wrap_task_manager(module):
    cls = module.TaskManager
    original = cls.__init__

    def __init__(self, *args, include_path=None, include_defaults=True, **kwargs):
        if include_defaults:
            from moepatch.eval.tasks import task_config_dir

            ours = str(task_config_dir())
            paths = [] if include_path is None else (
                list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
            if ours not in map(str, paths):
                include_path = [*paths, ours]
        original(self, *args, include_path=include_path, include_defaults=include_defaults, **kwargs)

    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__


_WRAPS = {"lm_eval.api.registry": _wrap_registry, "lm_eval.tasks.manager": _wrap_task_manager}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, wrap):
        self.inner, self.wrap = inner, wrap

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.wrap(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        wrap = _WRAPS.get(fullname)
        if wrap is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, wrap)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
