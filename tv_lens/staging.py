"""Output folders that appear only when complete, and never over someone else's files.

:func:`staged_folder` hands out a staging folder beside the destination; when the block finishes
it writes the marker :data:`MARKER` (tv_lens version, command, the files written) and swaps the
staging folder into place, and when the block raises it removes the staging folder, so a failed
run leaves nothing half-written.

Each staging folder holds :data:`OWNER` (process id and host) until it is swapped in; a later run
removes the staging folders whose owner is gone (a run killed with ``kill -9``) and never touches
a live run's.

The one rule for writing a folder, the same for ``tv-lens analyze``/``demo``/``zoo``,
``Analysis.save`` and ``Zoo.save``: tv_lens writes only into a new or empty folder or into its own
earlier output, a folder whose marker lists every file in it (or, written before markers, one
holding only ``analyze``'s or ``zoo``'s files). Any other non-empty folder is refused, and so is a
destination equal to, inside, or holding one of the folders the command reads. ``analyze`` swaps
a complete new folder in; ``save`` writes its files into the folder (replacing its own files of
the same names) and updates the marker; a zoo's folder is reused on purpose (it keeps the finished
tasks, so a re-run resumes). A report file is overwritten only where it is a tv_lens report.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tv_lens.errors import TvLensError

#: The file in every output folder tv_lens writes that says so.
MARKER = ".tv_lens-output.json"
#: What ``analyze`` wrote before markers existed (an earlier version's output is still replaced).
LEGACY_FILES = frozenset({"heads.csv", "neurons.csv", "matrices.csv", "summary.csv",
                          "summary.json", "report.html"})
#: What ``tv-lens zoo`` wrote before markers existed: its tables, ``zoo.json`` and its tasks.
LEGACY_ZOO_FILES = LEGACY_FILES - {"summary.json"} | {
    "head_similarity.csv", "matrix_similarity.csv", "neuron_similarity.csv", "similarity.csv",
    "clusters.csv", "zoo.json", ".zoo-tasks"}
#: The first bytes of every HTML report tv_lens writes (so a report is replaced only by one).
REPORT_SIGNATURE = '<meta name="generator" content="tv_lens">'
#: How reports began before the signature: their title.
_OLD_REPORT_START = "<meta charset='utf-8'><title>tv_lens"
#: The folder inside a zoo's output that keeps its finished tasks (:mod:`tv_lens.zoo`).
ZOO_TASKS = ".zoo-tasks"


def written_by_tv_lens(folder: Path) -> bool:
    """Whether every entry of ``folder`` is output tv_lens wrote (see the module docstring)."""
    names = {p.name for p in folder.iterdir()} - {OWNER, ZOO_TASKS}  # (our own names)
    try:
        if MARKER in names:
            listed = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("files", [])
            return names - {MARKER} <= set(listed)
        if not names:
            return True  # empty, or a zoo interrupted before its tables
        if "zoo.json" in names:  # what Zoo.save wrote before markers: {failed, info: {base, …}}
            zoo = json.loads((folder / "zoo.json").read_text(encoding="utf-8"))
            return (names <= LEGACY_ZOO_FILES and set(zoo) == {"failed", "info"}
                    and {"base", "models"} <= set(zoo["info"]))
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        return names <= LEGACY_FILES and "tv_lens_version" in summary.get("info", {})
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def write_marker(folder: Path, command: str) -> None:
    """Record that tv_lens wrote everything in ``folder`` (:data:`MARKER`)."""
    from tv_lens import __version__

    files = sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, OWNER))
    marker = dict(written_by="tv_lens", tv_lens_version=__version__, command=command, files=files)
    (folder / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")


def check_report_path(path: Path) -> None:
    """Refuse to overwrite a file that is not a report tv_lens wrote."""
    if path.is_dir():
        raise TvLensError(f"{str(path)!r} is a folder; pass the report's file path (report.html).")
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(4096)
        if REPORT_SIGNATURE.encode() not in head and _OLD_REPORT_START.encode() not in head:
            raise TvLensError(f"{str(path)!r} exists and is not a report tv_lens wrote; choose "
                              "another path (tv_lens overwrites only its own reports).")


def check_destination(out: Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse ``out`` where writing it could destroy what tv_lens did not write.

    Raises:
        TvLensError: ``out`` is an existing file, is (inside, or holds) one of ``inputs``, or is
            a non-empty folder that is not tv_lens's own earlier output.
    """
    if out.is_symlink():
        raise TvLensError(f"--out {str(out)!r} is a symbolic link. Pass the folder itself (tv_lens "
                          "replaces a folder, never what a link points to).")
    if out.exists() and not out.is_dir():
        raise TvLensError(f"--out {str(out)!r} is an existing file, not a folder. Pass a folder "
                          "path (it is created, or an earlier run's output in it is replaced).")
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise TvLensError(f"--out {str(out)!r} is the current folder or holds it; tv_lens replaces "
                          "its output folder whole. Pass a new folder, e.g. --out tv_lens_out.")
    for given in inputs:
        source = Path(given).expanduser()
        if not source.exists():
            continue  # a hub name, not a folder
        source = source.resolve()
        relation = ("is" if target == source else "is inside" if source in target.parents
                    else "holds" if target in source.parents else None)
        if relation:
            raise TvLensError(f"--out {str(out)!r} {relation} the input folder {str(source)!r}; "
                              "tv_lens never writes into or replaces a folder it reads. Pass a "
                              "separate folder for the output.")
    found = sorted(p.name for p in out.iterdir() if p.name != OWNER) if out.is_dir() else []
    if found and not written_by_tv_lens(out):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise TvLensError(f"--out {str(out)!r} already holds files tv_lens did not write "
                          f"({shown}). Choose an empty or new folder: tv_lens replaces only its "
                          "own earlier output.")


#: Inside every staging folder: who made it (process id and host), so a later run can tell a
#: dead run's leftovers (swept) from a running one's (never touched).
OWNER = ".tv_lens-owner.json"


def _claim(folder: Path) -> None:
    (folder / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _owner_gone(folder: Path) -> bool:
    try:
        owner = json.loads((folder / OWNER).read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours, or still being made: leave it
    if host != socket.gethostname() or os.name != "posix":
        return False  # another machine's run (a shared file system), or no kill(pid, 0): unknown
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def sweep(out: Path, announce=print) -> list[Path]:
    """Remove the staging folders a killed run left beside ``out`` (its owner process is gone);
    returns what was removed."""
    swept = []
    for kind in ("partial", "old"):
        for folder in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
            if folder.is_dir() and _owner_gone(folder):
                earlier = folder / out.name  # killed mid-swap: the earlier output comes back
                if kind == "old" and earlier.is_dir() and not out.exists():
                    earlier.rename(out)
                shutil.rmtree(folder, ignore_errors=True)
                swept.append(folder)
    if swept:
        announce(f"removed {len(swept)} staging folder(s) a killed run left beside {out}/")
    return swept


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def staged_folder(out: str | Path, *, inputs: Iterable[str | Path] = (), command: str = "",
                  announce=print) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it becomes ``out``, with the marker written.

    Args:
        out: the destination folder.
        inputs: the folders the command reads (checkpoints, adapters): ``out`` may not be one of
            them, inside one, or hold one.
        command: recorded in the marker (e.g. ``"analyze"``).

    Raises:
        TvLensError: from :func:`check_destination`, or ``out``'s parent cannot be written.
    """
    out = Path(out).expanduser()
    check_destination(out, inputs)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep(out, announce)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        _claim(stage)
        stage.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a folder is made as mkdir would
    except OSError as exc:
        raise TvLensError(f"Cannot write the output folder {str(out)!r}: {exc.strerror or exc}. "
                          "Pass a folder you can write to with --out.") from None
    try:
        yield stage
        (stage / OWNER).unlink()
        write_marker(stage, command)
        check_destination(out, inputs)  # files may have appeared in out during the run
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        _claim(old)
        out.rename(old / out.name)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        announce(f"replaced the earlier output in {out}/")
    else:
        stage.rename(out)
