"""A local folder as a pyarrow filesystem that cannot be left: `confined(root)`.

Its paths are relative to the root. Every operation resolves its path with `os.path.realpath` (symlinks and `..`
included) and refuses one that lands outside the root, then opens the *resolved* path, so the path checked is the
path opened, in whichever process opens it (the server listing a dataset, or a cluster worker reading it: the
filesystem is pickled by its root, never by a client's text). Listings are walked here rather than by Arrow, so a
symlinked folder that points out of the root (or back into it, in a loop) is skipped instead of followed.

Not covered: someone with write access to the root itself swapping a folder for a symlink between the check and the
open. Local users who can write the dataset roots are as trusted as the operator (docs/SECURITY.md).
"""
from __future__ import annotations

import os

import pyarrow.fs as pafs


class OutsideRoot(PermissionError):
    """A path that resolves outside the confined root."""


class ConfinedHandler(pafs.FileSystemHandler):
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.local = pafs.LocalFileSystem()

    def __reduce__(self):
        return ConfinedHandler, (self.root,)

    # Paths: relative to the root outside, resolved and checked inside ------------------------------------
    def real(self, path: str) -> str:
        """The resolved local path of `path`, or OutsideRoot. Raised with the same text whatever is there."""
        if "\0" in path:
            raise OutsideRoot("a path with a NUL byte")
        resolved = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if not self.inside(resolved):
            raise OutsideRoot(f"{path!r} is outside the dataset root")
        return resolved

    def inside(self, resolved: str) -> bool:
        return resolved == self.root or resolved.startswith(self.root.rstrip(os.sep) + os.sep)

    def relative(self, resolved: str) -> str:
        return "" if resolved == self.root else os.path.relpath(resolved, self.root)

    def _info(self, path: str, real: str) -> pafs.FileInfo:
        info = self.local.get_file_info(real)
        return pafs.FileInfo(path, info.type, mtime=info.mtime, size=info.size)

    # The FileSystemHandler interface -----------------------------------------------------------------------
    def get_type_name(self) -> str:
        return "kred-confined"

    def equals(self, other) -> bool:
        return isinstance(other, ConfinedHandler) and other.root == self.root

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        return [self._info(p, self.real(p)) for p in paths]

    def get_file_info_selector(self, selector):
        base = self.real(selector.base_dir)
        if not os.path.isdir(base):
            if selector.allow_not_found:
                return []
            raise FileNotFoundError(f"{selector.base_dir!r} is not a folder")
        found, seen, pending = [], {base}, [base]
        while pending:
            folder = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    resolved = os.path.realpath(entry.path)
                    if not self.inside(resolved):            # a symlink out of the root: not part of it
                        continue
                    shown = self.relative(os.path.join(folder, entry.name))
                    is_dir = os.path.isdir(resolved)
                    found.append(self._info(shown, resolved))
                    if is_dir and selector.recursive and resolved not in seen:
                        seen.add(resolved)
                        pending.append(os.path.join(folder, entry.name))
        return found

    def create_dir(self, path, recursive):
        self.local.create_dir(self.real(path), recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(self.real(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(self.real(path), missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OutsideRoot("a dataset root is never emptied whole")

    def delete_file(self, path):
        self.local.delete_file(self.real(path))

    def move(self, src, dest):
        self.local.move(self.real(src), self.real(dest))

    def copy_file(self, src, dest):
        self.local.copy_file(self.real(src), self.real(dest))

    def open_input_stream(self, path):
        return self.local.open_input_stream(self.real(path))

    def open_input_file(self, path):
        return self.local.open_input_file(self.real(path))

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(self.real(path), metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(self.real(path), metadata=metadata)


def confined(root: str) -> pafs.FileSystem:
    """The folder `root` as a filesystem of paths relative to it that never reaches outside it."""
    return pafs.PyFileSystem(ConfinedHandler(root))
