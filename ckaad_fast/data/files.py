"""Finding image files and checking that they can be read.

Everything here reads local files only. File order is sorted and deterministic; hidden files and
folders (names starting with ``.``, e.g. macOS' ``._x.png`` resource forks) are never images.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Union

import numpy as np
from PIL import Image

from ..pixels import ImageRejected, check_finite, check_source_size

__all__ = ["IMAGE_EXTENSIONS", "CHECK_MODES", "CorruptImageWarning", "is_image_file", "list_images",
           "images_in_dir", "check_image", "check_mode", "readable", "warn_skip", "subdirs", "describe",
           "check_one_size"]

PathLike = Union[str, os.PathLike]

#: File extensions recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: How a data set checks its files when it indexes them.
CHECK_MODES = ("verify", "load", "none")


class CorruptImageWarning(UserWarning):
    """An image (or mask) could not be read and was left out of a data set."""


def is_image_file(path: PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    # Dot files include macOS' "._x.png" resource forks, which are not images.
    return name.startswith(".")


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` points to (links followed), or None (a broken link)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(directory: str, seen_dirs: set, found: list[str]) -> None:
    # Links are followed, but every real folder is entered once: a link to "." or ".." cannot
    # make the walk loop forever or list the same images again.
    key = _identity(directory)
    if key is None or key in seen_dirs:
        return
    seen_dirs.add(key)
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if is_hidden(e.name):
            continue
        try:
            is_dir = e.is_dir()  # follows links
        except OSError:
            is_dir = False
        if is_dir:
            _walk(e.path, seen_dirs, found)
        elif is_image_file(e.name):
            found.append(e.path)


def images_in_dir(directory: str, recursive: bool, exclude: Iterable[PathLike] = ()) -> list[str]:
    """Sorted image files in ``directory`` (and its visible sub-folders when ``recursive``, links
    followed, each real folder once, the folders of ``exclude`` left out)."""
    if not recursive:
        with os.scandir(directory) as entries:
            return sorted(e.path for e in entries if not is_hidden(e.name) and is_image_file(e.name) and e.is_file())
    seen_dirs = {k for k in (_identity(os.fspath(x)) for x in exclude) if k is not None}
    found: list[str] = []
    _walk(directory, seen_dirs, found)
    return sorted(found)


def list_images(path_or_paths: PathLike | Iterable[PathLike], recursive: bool = True,
                exclude: Iterable[PathLike] = ()) -> list[str]:
    """Sorted list of image files named by a folder, a file, or a list of folders and files.

    Folders are searched (recursively unless ``recursive=False``) for files with one of
    :data:`IMAGE_EXTENSIONS`; hidden files and folders (names starting with ``.``) are ignored.
    Links are followed, but each real folder is searched once and each real file listed once
    (under its first name in sorted order), so links to ``.`` or ``..`` neither loop nor repeat
    images. Folders in ``exclude`` (a results folder inside the input, say) are not searched.
    Files named directly must exist and have an image extension. The result is de-duplicated and
    sorted, so it is the same on every call.

    Raises:
        ValueError: a path does not exist, a folder holds no image, a named file is not an image,
            or nothing was given.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        items = [path_or_paths]
    else:
        items = list(path_or_paths)
    if not items:
        raise ValueError("list_images: no path given")
    exclude = list(exclude)
    out: set[str] = set()
    for item in items:
        p = os.fspath(item)
        if os.path.isdir(p):
            imgs = images_in_dir(p, recursive, exclude)
            if not imgs:
                raise ValueError(
                    f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in folder {p!r}"
                    + ("" if recursive else " (not searching sub-folders)")
                )
            out.update(imgs)
        elif os.path.isfile(p):
            if not is_image_file(p):
                raise ValueError(
                    f"{p!r} is not an image file: expected one of {', '.join(IMAGE_EXTENSIONS)}"
                )
            out.add(p)
        else:
            raise ValueError(f"path does not exist: {p!r}")
    return _one_name_per_file(sorted(out))


def _one_name_per_file(paths: list[str]) -> list[str]:
    """``paths`` without the later names of a file already listed (links, hard links)."""
    seen: set = set()
    kept = []
    for p in paths:
        key = _identity(p)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        kept.append(p)
    return kept


def check_image(path: PathLike, full: bool = False, image_size=None) -> str | None:
    """Return ``None`` when PIL can read ``path`` (and, given the model's ``image_size``, the
    image can be scored), otherwise a short description of why not.

    ``full=False`` runs ``Image.verify()`` (reads the header and, for PNG, checks the chunk CRCs
    without decoding); ``full=True`` also decodes the pixels, which also catches truncated JPEGs.
    With ``image_size``: an image far below it is refused from its header
    (:func:`~.images.check_source_size`), and a float image (the only kind that can hold a NaN)
    is decoded and refused when a pixel is not finite, in either mode.
    """
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.verify()
        if image_size is not None:
            check_source_size(size, image_size)
        if full or (image_size is not None and mode == "F"):
            with Image.open(path) as im:
                im.load()
                if image_size is not None and mode == "F":
                    check_finite(np.asarray(im, dtype=np.float32))
    except ImageRejected as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure to read means "skip this file"
        return f"{type(e).__name__}: {e}"
    return None


def check_mode(check: str) -> str:
    """``check`` itself when it is one of :data:`CHECK_MODES`, else a ValueError."""
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    return check


def readable(path: str, check: str, image_size=None) -> str | None:
    """None when ``path`` passes the check ``check`` (one of :data:`CHECK_MODES`) for a model of
    input ``image_size`` (see :func:`check_image`), else why not."""
    if check == "none":
        return None
    return check_image(path, full=(check == "load"), image_size=image_size)


def warn_skip(path: str, reason: str) -> None:
    """Warn that a data set leaves ``path`` out (the warning points at the data set's caller)."""
    warnings.warn(f"skipping image {path!r}: {reason}", CorruptImageWarning, stacklevel=3)


def subdirs(path: str) -> list[str]:
    """Sorted names of the visible sub-folders of ``path`` (none when it cannot be listed)."""
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not is_hidden(e.name))
    except OSError:
        return []


def describe(path: str) -> str:
    """What ``path`` holds, for error messages that say what was found instead of a layout."""
    if not os.path.exists(path):
        return f"{path!r} does not exist"
    if not os.path.isdir(path):
        return f"{path!r} is not a folder"
    subs = subdirs(path)
    n_img = len(images_in_dir(path, recursive=False))
    return f"{path!r} holds sub-folders {subs} and {n_img} image file(s)"


def check_one_size(paths, what: str, why: str) -> None:
    """An :class:`~ckaad_fast.errors.ArgumentError` naming ``data`` when the images at ``paths``
    come in more than one size (read from the files' headers, before anything is decoded);
    unreadable files are left to the data set's own check."""
    from PIL import Image

    from ..errors import ArgumentError

    first: dict[tuple[int, int], str] = {}
    for path in paths or ():
        try:
            with Image.open(path) as im:
                first.setdefault(im.size, path)
        except OSError:
            continue
        if len(first) > 1:
            (a, pa), (b, pb) = list(first.items())[:2]
            raise ArgumentError("data", f"{what}'s images come in more than one size ({a[0]}x{a[1]} for {pa!r}, "
                                        f"{b[0]}x{b[1]} for {pb!r}): {why}; use images of one size")
