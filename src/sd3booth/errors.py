"""The one exception type for bad input, and how any failure reads on one line.

The CLI prints ``error: <line>`` for every failure and exits with the code :func:`explain` gives: 2 for
anything a user can cause or meet (a UserError, a full or read-only disk, a missing package, no network,
out of memory), 130 for Ctrl-C, 1 for an unexpected error (a bug). No imports: this is the lowest layer.
"""

from __future__ import annotations

import errno
import re


class UserError(Exception):
    """Bad input from the user: what is wrong, where (file, line), and what to do.

    Raised anywhere; caught only by the CLI, which prints ``error: <message>`` and exits with code 2
    without a traceback. Raise it before anything is written, so nothing cached or saved is lost.
    """


# pip names of modules whose import name differs
PIP_NAMES = {"PIL": "pillow", "yaml": "pyyaml", "google": "protobuf", "sklearn": "scikit-learn", "cv2": "opencv-python"}
NETWORK_ERRORS = ("ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout", "gaierror",
                  "OfflineModeIsEnabled", "LocalEntryNotFoundError", "MaxRetryError", "NewConnectionError")  # fmt: skip
INTERRUPTED = "interrupted; cached files and saved checkpoints are kept (a training run continues with "
INTERRUPTED += "--resume_from_checkpoint latest)"


def _one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 20:
        out.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return out


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _explain_os_error(e: OSError) -> str:
    where = e.filename or next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None)
    what = f"{e.strerror or e}" + (f": {where}" if where else "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"disk full ({what}); free some space or put --output_dir / --cache_dir on another disk, then run the "
            "same command again (a training run continues with --resume_from_checkpoint latest)"
        )
    if e.errno == errno.EROFS:
        return f"cannot write ({what}); choose a --output_dir / --cache_dir on a writable disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission ({what}); check the path's permissions, or choose a folder you own"
    if e.errno == errno.ENOMEM:
        return f"out of memory ({what}); close other programs or lower --train_batch_size / --resolution"
    return f"{what}; check the path and run again"


def explain(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for any exception that reaches the command line."""
    if isinstance(e, UserError):
        return 2, _one_line(e)
    if isinstance(e, KeyboardInterrupt):
        return 130, INTERRUPTED
    chain = _chain(e)
    names = set().union(*(_names(x) for x in chain))
    first_line = _one_line(str(e).split("\n")[0])[:300]
    if "OutOfMemoryError" in names and "cuda" in str(e).lower():
        return 2, (
            f"out of GPU memory ({first_line}); train: pass a smaller --max_vram so the planner picks thriftier "
            "settings (block swap, checkpointing, NF4/fp8), or lower --train_batch_size or --resolution; "
            "generate: lower --resolution, or pass --t5_precision int8, nf4 or cpu"
        )
    if "OutOfMemoryError" in names or isinstance(e, MemoryError) or "can't allocate memory" in str(e):
        return 2, (
            f"out of memory ({first_line or type(e).__name__}); close other programs, or lower "
            "--train_batch_size or --resolution"
        )
    if isinstance(e, ImportError):
        module = (e.name or "").split(".")[0]
        if isinstance(e, ModuleNotFoundError) and module:
            pip = PIP_NAMES.get(module, module)
            return 2, f"missing package '{pip}' ({first_line}); pip install {pip}"
        return 2, f"a package does not fit this sd3booth ({first_line}); reinstall its dependencies: pip install -e ."
    if names & set(NETWORK_ERRORS):
        return 2, (
            f"no network ({type(e).__name__}); check your connection, or pass local folders "
            "(set HF_HUB_OFFLINE=1 to use only the Hugging Face cache)"
        )
    if isinstance(e, OSError):
        return 2, _one_line(_explain_os_error(e))
    if "SafetensorError" in names:
        return 2, f"a saved tensor file is damaged ({first_line}); rerun with --debug to see which, then delete it"
    return 1, f"unexpected {type(e).__name__}: {first_line} (a bug: rerun with --debug and report the traceback)"
