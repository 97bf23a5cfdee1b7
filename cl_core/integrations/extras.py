"""The optional packages: the up-front check of an extra (`require`), the ImportError that
names the pip extra to install, and whether transformers' adapter API accepts the installed peft.
"""
from __future__ import annotations

# The import name and the pip name of each package an extra brings (pyproject.toml's
# [project.optional-dependencies]); `require` checks them all before any work starts.
_HF = (("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
       ("safetensors", "safetensors"))
_GROUPING = (("sklearn", "scikit-learn"), ("scipy", "scipy"))
EXTRA_PACKAGES = {
    "hf": _HF,
    "grouping": _GROUPING,
    "runner": _HF + _GROUPING + (("tokenizers", "tokenizers"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib"),
                                 ("numpy", "numpy"), ("PIL", "pillow")),
}


def install_hint(extra: str) -> str:
    """The install command that works: cl_core is installed from its checkout (it is not on
    a package index, where the name could be someone else's)."""
    return f'pip install ".[{extra}]" (in the cl_core checkout)'


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a finder that refuses it, a broken half-install
        return False


class MissingExtra(ImportError):
    """An optional package is not installed (the message says which and how to install it)."""


def require(extra: str, what: str) -> None:
    """Refuse in one line, before any work, when a package of ``extra`` is missing: which
    ones, and the command that installs them. ``what`` names the caller (`cl-core run`)."""
    missing = [pip for module, pip in EXTRA_PACKAGES[extra] if not _installed(module)]
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)} (the '{extra}' extra), which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed; install with: {install_hint(extra)}")


def missing_extra(module: str, extra: str, package: str, exc: ImportError) -> ImportError:
    """The ImportError an integration raises when importing its optional ``package`` failed with
    ``exc``: one naming the pip extra when ``package`` itself is missing; ``exc`` unchanged when
    something else is (an installed package whose own dependency is broken must say so, not be
    reported as absent)."""
    missing = getattr(exc, "name", None) or ""
    top = package.split(".")[0]
    if missing and missing.split(".")[0] != top:
        return exc
    return ImportError(f"{module} needs {top}; install it with: {install_hint(extra)}")


def transformers_adapter_support() -> "str | None":
    """None when transformers' own adapter API (``model.load_adapter``, ``PeftAdapterMixin``)
    accepts the installed peft; otherwise one line naming which transformers needs which peft
    and how to fix it. transformers refuses an older peft with a long traceback deep inside
    ``load_adapter``; callers (and tests) ask here first to say it in one line instead."""
    try:
        import peft
        import transformers
        from transformers.integrations import peft as hf_peft
    except ImportError as exc:
        return f"transformers' adapter API needs transformers and peft ({exc}); install them with: {install_hint('hf')}"
    required = getattr(hf_peft, "MIN_PEFT_VERSION", None)
    if required is None:  # older transformers without a declared floor: nothing to compare
        return None
    from packaging.version import Version
    if Version(peft.__version__) >= Version(str(required)):
        return None
    return (f"transformers {transformers.__version__} needs peft >= {required} for its adapter API, "
            f"peft {peft.__version__} is installed; fix with: pip install 'peft>={required}' "
            f"(or a transformers release that accepts peft {peft.__version__})")
