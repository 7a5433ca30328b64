"""ouro-train: fine-tuning pipeline for Ouro looped language models.

Importing the package registers the Ouro model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads an Ouro checkpoint directory without
``trust_remote_code``: at once when transformers is already imported, else the moment it is. The
package itself imports neither torch nor transformers, so the command-line tools answer `--help` and
refuse a bad config before paying for them. ``ouro_train.OuroConfig`` and the model classes are
imported on first use.
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_MODEL_NAMES = ("OuroConfig", "OuroForCausalLM", "OuroModel")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from ouro_train import model

        return getattr(model, name)
    raise AttributeError(f"module 'ouro_train' has no attribute {name!r}")


def _register() -> None:
    import ouro_train.model  # noqa: F401  (registers the Auto classes on import)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it asks the other finders for `transformers` and has the loader they give run
    `_register` once the package has executed. A spec that is only looked at (libraries probe with
    `importlib.util.find_spec`) is never executed; the hook leaves once one is."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                break
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                execute(module)
                _register()

            spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
