"""Image GPT pretraining at cluster scale: one import namespace for every stage.

The stages live in the checkout's top-level folders (``data_pipeline/``, ``kernels/``, ``pretrain/``,
``evals/``, ``cluster/``) and are imported as ``igpt.data_pipeline``, ``igpt.kernels`` and so on; the wheel
and the editable install map them there with setuptools' ``package-dir``. The folders are namespace
portions (no ``__init__.py``), so even with a checkout on ``sys.path`` a regular package of the same
top-level name (Hugging Face's ``kernels``, OpenAI's ``evals``) is the one ``import kernels`` finds. Run
straight from a checkout without an install (``PYTHONPATH=CHECKOUT``, as the GPU scripts do), this package
adds the checkout to its own ``__path__``, so the same names resolve to the same folders.
"""
from __future__ import annotations

from pathlib import Path


def _checkout_root() -> Path | None:
    """The source checkout this package runs from (an editable install or ``PYTHONPATH``), or None for a wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "pretrain" / "train.py").is_file() else None


CHECKOUT: Path | None = _checkout_root()
if CHECKOUT is not None:
    __path__.append(str(CHECKOUT))  # type: ignore[name-defined]  # igpt.pretrain is CHECKOUT/pretrain
