"""Writing files without losing the user's: output folders, images, and the lock of the built-in model's cache.

Rules (README "Errors and limits"):
- A folder target (a bundle) is written in a temporary sibling and renamed into place. It may replace what is
  there only when that is missing, an empty folder, or a bundle illume-rt wrote and the caller asked to replace
  (``overwrite``). Any other folder is refused, whatever the flags; so are the current directory (and its
  ancestors), home directories, the filesystem root and a folder holding the source bundle.
- An image goes to a unique temporary file in the target's folder, is flushed to disk and then renamed, so two
  writers of one path each leave a complete file (the last rename wins). A target that exists and is not a
  regular file (folder, device, FIFO, socket) is refused. The format follows the extension.
- Temporary names carry the writer's process id; a later writer removes the ones whose process is gone (a run
  killed with SIGKILL), and nothing ever reads them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from illume_rt.contract import BUNDLE_FORMAT_NAME, MANIFEST
from illume_rt.errors import OutputError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def describe_oserror(exc: OSError) -> str:
    """One line for a failed write, naming the likely fix."""
    hints = {errno.ENOSPC: "free some disk space", errno.EFBIG: "the file size limit was reached (ulimit -f)",
             errno.EDQUOT: "the disk quota is exhausted", errno.EACCES: "choose a folder you can write to",
             errno.EROFS: "the filesystem is read-only", errno.EPERM: "choose a folder you can write to"}
    what = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    hint = hints.get(exc.errno)
    return f"{what}{where}" + (f": {hint}" if hint else "")


# -- folders ---------------------------------------------------------------------------------------------------

def is_bundle_dir(path: Path) -> bool:
    """A folder illume-rt wrote: its manifest is readable JSON naming the bundle format."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT_NAME


def _protected_dirs() -> set[Path]:
    """Folders no command may replace: the filesystem root, home directories, and the current directory and its
    ancestors (replacing an ancestor would remove the current directory)."""
    protected = {Path("/").resolve(), Path.home().resolve()}
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        protected.update([cwd, *cwd.parents])
    with contextlib.suppress(ImportError, KeyError):
        import pwd

        protected.update(Path(entry.pw_dir).resolve() for entry in pwd.getpwall() if entry.pw_dir)
    return protected


def check_output_dir(out_dir: str | Path, overwrite: bool = False, sources: tuple = ()) -> Path:
    """The resolved folder a command may write (missing, empty, or an illume-rt bundle with ``overwrite``), or
    ``OutputError`` naming the fix. ``sources``: folders the command reads, which it must not replace."""
    out = Path(out_dir).resolve()
    if out in _protected_dirs():
        raise OutputError(f"refusing to write a bundle over {out} (the current directory, one of its parents, a "
                          "home directory or /); name a new folder, e.g. -o bundles/mymodel")
    for source in sources:
        source = Path(source).resolve()
        if source == out or out in source.parents:
            raise OutputError(f"refusing to write {out}: it holds the source bundle {source}; name another folder")
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; name a new folder for the bundle")
    try:
        empty = next(out.iterdir(), None) is None
    except OSError as exc:
        raise OutputError(f"cannot read {out}: {describe_oserror(exc)}") from None
    if empty:
        return out
    if not is_bundle_dir(out):
        raise OutputError(f"{out} is a folder that is not an illume-rt bundle and is not empty; nothing was "
                          "changed. Name a new or empty folder")
    if not overwrite:
        raise OutputError(f"{out} already holds a bundle; pass --overwrite to replace it, or name a new folder")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _scratch_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-(\d+)-[A-Za-z0-9_]+$")


def clean_stale_scratch(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` that a killed writer left (its process is gone)."""
    removed = []
    pattern = _scratch_pattern(out.name)
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            match = pattern.match(entry.name)
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                removed.append(entry)
    return removed


def scratch_dir(out: Path) -> Path:
    """A new temporary folder beside ``out`` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_scratch(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def publish_dir(work: Path, out_dir: Path, overwrite: bool = False, sources: tuple = ()) -> Path:
    """Move a fully written folder into place. The target is checked again here (it may have changed while the
    work was done); a bundle there is swapped out and removed only after the new one is in place."""
    out_dir = check_output_dir(out_dir, overwrite, sources)
    if out_dir.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
        try:
            work.rename(out_dir)
        except OSError:
            os.replace(old / "previous", out_dir)  # put the previous bundle back
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out_dir)
    return out_dir


# -- images ----------------------------------------------------------------------------------------------------

def image_target(path: str | Path) -> tuple[Path, str]:
    """(the file to write, the Pillow format) for an image output path, or ``OutputError`` before any work.

    A symlink is followed (its target is written, as any program writing a file does)."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise OutputError(f"cannot write {path}: one of its parents is not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {describe_oserror(exc)}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise OutputError(f"{path} is {kind}, not a regular file; name an image file, e.g. {path}/out.png"
                          if kind == "a folder" else f"{path} is {kind}, not a regular file; name an image file")
    suffix = path.suffix.lower()
    fmt = IMAGE_FORMATS.get(suffix)
    if fmt is None:
        raise OutputError(f"cannot write an image to {path}: the extension {suffix or '(none)'} is not supported; "
                          "use .png, .jpg or .webp")
    if fmt == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise OutputError("this Pillow has no WebP support; write .png or .jpg")
    parent = real.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"cannot write {path}: {ancestor} is not a folder")
            break
    return real, fmt


def _umask() -> int:
    """The process umask without changing it (os.umask would, for every thread, for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def save_image(pixels, path: str | Path) -> Path:
    """Write an [H, W, 3] uint8 array as the image format of ``path``'s extension, atomically."""
    from PIL import Image

    real, fmt = image_target(path)
    tmp = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.tmp-{os.getpid()}-", dir=real.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an image gets the mode any new file gets
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(pixels).save(fh, format=fmt)
            fh.flush()
            os.fsync(fh.fileno())
        image_target(path)  # the target may have become a folder or a FIFO meanwhile
        os.replace(tmp, real)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {describe_oserror(exc)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return real


# -- locks -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def exclusive_lock(path: Path):
    """An advisory lock held for the block (fcntl.flock; released by the kernel if the process dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_files(packages, modules=()) -> list[Path]:
    """The .py files of ``modules`` and of ``packages`` (each with its subpackages), where they are installed (a
    checkout, or site-packages of a wheel), each once, in an order that does not depend on where they are (by
    module, then package, then path inside it): what caches keyed by the code read (``cli.builtin_key``,
    ``export/trace_cache.py``). Located, not imported, so that a runtime-only install (no torch) finds the same
    files."""
    import importlib.util

    files = [Path(importlib.util.find_spec(module).origin).resolve() for module in modules]
    for package in packages:
        for root in importlib.util.find_spec(package).submodule_search_locations or ():
            files += sorted((path.resolve() for path in Path(root).rglob("*.py")),
                            key=lambda path, root=Path(root).resolve(): path.relative_to(root).parts)
    return list(dict.fromkeys(files))
