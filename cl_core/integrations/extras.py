"""The optional packages of the integrations: the ImportError that names the pip extra to
install, and whether transformers' adapter API accepts the installed peft.
"""
from __future__ import annotations


def missing_extra(module: str, extra: str, package: str, exc: ImportError) -> ImportError:
    """The ImportError an integration raises when importing its optional ``package`` failed with
    ``exc``: one naming the pip extra when ``package`` itself is missing; ``exc`` unchanged when
    something else is (an installed package whose own dependency is broken must say so, not be
    reported as absent)."""
    missing = getattr(exc, "name", None) or ""
    top = package.split(".")[0]
    if missing and missing.split(".")[0] != top:
        return exc
    return ImportError(f"{module} needs {top}; install it with: pip install cl_core[{extra}] "
                       f"(from a checkout: pip install -e '.[{extra}]')")


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
        return f"transformers' adapter API needs transformers and peft ({exc}); install them with: pip install cl_core[hf]"
    required = getattr(hf_peft, "MIN_PEFT_VERSION", None)
    if required is None:  # older transformers without a declared floor: nothing to compare
        return None
    from packaging.version import Version
    if Version(peft.__version__) >= Version(str(required)):
        return None
    return (f"transformers {transformers.__version__} needs peft >= {required} for its adapter API, "
            f"peft {peft.__version__} is installed; fix with: pip install 'peft>={required}' "
            f"(or a transformers release that accepts peft {peft.__version__})")
