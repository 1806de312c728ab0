"""`file://` sources: below an allowed root (symlinks resolved first, so a link cannot lead
out), never in /dev, /proc or /sys whatever the roots, regular files only."""

from __future__ import annotations

import contextlib
import os
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from modelloader_workers.fetching.located import Located, Reader
from modelloader_workers.fetching.request import SourceError, SourcePolicy

# Kernel and device trees: never a model, whatever the roots say (`--model-root /`).
FORBIDDEN_TREES = (Path("/dev"), Path("/proc"), Path("/sys"))


def locate(uri: str, base_dir: str | None, policy: SourcePolicy) -> Located:
    path = local_path(uri, Path(base_dir) if base_dir else None, policy.roots)
    stack = contextlib.ExitStack()
    stream = stack.enter_context(open_regular(path))  # the bytes come from this very file
    st = os.fstat(stream.fileno())
    version = f"file|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"

    @contextlib.contextmanager
    def open_file() -> Iterator[Reader]:
        yield stream.read

    return Located(open_file, size=st.st_size, version=version, close=stack.close)


def local_path(uri: str, base_dir: Path | None, roots: tuple[Path, ...]) -> Path:
    """The file a file:// URI names, if it lies under an allowed root. `file:///abs/path`
    is absolute; `file://model.tflite` or `file://./sub/model.tflite` is relative to the
    manifest's folder (so an example folder can be moved as a whole)."""
    rest = uri[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    text = urllib.parse.unquote(rest)
    if "\x00" in text:
        raise SourceError(f"{uri}: the path contains a NUL byte")
    if text.startswith("/"):
        candidate = Path(text)
    elif base_dir is None:
        raise SourceError(f"{uri}: a relative path needs a manifest folder to start from")
    else:
        candidate = base_dir / text
    resolved = Path(os.path.realpath(candidate))
    if any(resolved.is_relative_to(tree) for tree in FORBIDDEN_TREES):
        raise SourceError(
            f"{uri}: {resolved} is in /dev, /proc or /sys: a device or kernel file, "
            "not a regular file"
        )
    roots = tuple(Path(os.path.realpath(r)) for r in roots)
    if not any(resolved.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots) or "none"
        raise SourceError(
            f"{uri}: {resolved} is outside the allowed model roots ({shown}); "
            "add its folder with --model-root"
        )
    return resolved


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """Open a regular file only: a device, FIFO or /proc entry is refused without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SourceError(f"file://{path}: no such file") from None
    except OSError as error:
        raise SourceError(f"file://{path}: cannot open: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"file://{path}: not a regular file")
    with os.fdopen(fd, "rb") as stream:
        yield stream
