"""Output folders that appear only when complete.

:func:`staged_folder` hands out a staging folder beside the destination; when the block finishes
it swaps the staging folder into place (replacing an earlier run's output, and saying so), and
when the block raises it removes the staging folder, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tv_lens.errors import TvLensError


@contextmanager
def staged_folder(out: str | Path, *, announce=print) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it becomes ``out``.

    Raises:
        TvLensError: ``out`` is an existing file, or its parent folder cannot be written.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise TvLensError(f"--out {str(out)!r} is an existing file, not a folder. Pass a folder "
                          "path (it is created, or an earlier run's output in it is replaced).")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise TvLensError(f"Cannot write the output folder {str(out)!r}: {exc.strerror or exc}. "
                          "Pass a folder you can write to with --out.") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        out.rename(old / out.name)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        announce(f"replaced the earlier output in {out}/")
    else:
        stage.rename(out)
