"""Reading torch files from strangers: always ``weights_only=True``, and torch's refusals told in the library's own
words: which global the file refers to and that the file is refused, never torch's advice to turn the protection off
(``weights_only=False``), which would run the file's code.

Every loader of the library (a resumed run's ``ckpt_path``, ``load_from_checkpoint``, ``load_quantized``, a
distillation teacher's checkpoint, a resumed sensitivity analysis) goes through :func:`load_weights` or
:func:`refusal`.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import IO, Any

import torch

#: How torch names the global a refused file refers to: a blocked module's (``posix.system``), or one not allowed.
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)")
#: torch's reason for other refusals (an opcode, a type it does not build).
_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)\n\n?(?:Check|$)", re.DOTALL)


def refusal(error: pickle.UnpicklingError) -> str:
    """Why torch refused a file, in one line that never advises loading it with ``weights_only=False``.

    Example:
        >>> refusal(pickle.UnpicklingError(
        ...     "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
        ...     "succeed.\\n\\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\\n"
        ... ))
        'it refers to posix.system, code that loading it would run: the file is refused'
    """
    text = str(error)
    found = _GLOBAL.search(text)
    if found is not None:
        return f"it refers to {found[1].rstrip('.')}, code that loading it would run: the file is refused"
    reason = _REASON.search(text)
    detail = " ".join(reason[1].split()) if reason else "it holds more than tensors and plain values"
    return f"it is not a file of tensors and plain values ({detail[:200]}): the file is refused"


def load_weights(path: str | os.PathLike[str] | IO[bytes], what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file torch refuses or cannot read raises
    ``ValueError``: ``what`` (the file and its role, e.g. ``"teacher='t.ckpt'"``), a colon, and why.

    Example:
        >>> import io
        >>> load_weights(io.BytesIO(b"not a checkpoint"), "teacher='t.ckpt'")
        Traceback (most recent call last):
        ...
        ValueError: teacher='t.ckpt': it is not a file of tensors and plain values (Unsupported operand 110): the file is refused
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if _GLOBAL.search(text) or "Weights only load failed" in text:
            raise ValueError(f"{what}: {refusal(error)}") from None
        raise ValueError(f"{what}: torch cannot read it: {text.splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{what}: torch cannot read it: {str(error).splitlines()[0]}") from None
