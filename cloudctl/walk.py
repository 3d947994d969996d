"""The files of a project that a snapshot holds: a walk honouring ignore files, and the same walk in a child process.

`walk_project` lists the files to send, honouring `.gitignore` and `.cloudignore` at every level
(gitignore semantics, each file relative to its own directory), `.git/info/exclude` and the
project's `job.excludes`; `.git` is always skipped. Symbolic links to files inside the project are
followed; any other link is refused before anything is sent.

A walk of 10,000 files is a stat call each, about as long as everything else an incremental sync
does; `PendingWalk` runs it in a forked child while `cloudctl sync` starts the rest (its imports,
the hash cache), and reads the result back through a pipe. This module imports little for that
reason: the child starts from what is loaded when it forks.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys

from cloudctl.errors import CloudctlError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (7 ms): `cloudctl sync` starts its walk first
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any

    import pathspec

    from cloudctl.project import Project

IGNORE_FILES = (".gitignore", ".cloudignore")  # in this order: .cloudignore has the last word


class FileEntry:
    """One file of the project: where it is in the snapshot and where its bytes are read from."""

    __slots__ = ("_source", "base", "mode", "mtime_ns", "path", "sha256", "size")

    def __init__(self, path: str, source: str | None, size: int, mtime_ns: int, mode: int, sha256: str = "",
                 base: str = "") -> None:
        self.path = path  # relative to the project root, '/'-separated
        self._source = source  # None: the file is `base + path` (see `source`)
        self.size = size
        self.mtime_ns = mtime_ns
        self.mode = mode  # permission bits, st_mode & 0o777
        self.sha256 = sha256
        self.base = base  # the project root with a trailing separator

    @property
    def source(self) -> str:
        """The absolute path to read: the file itself, or the target of the symbolic link it is.

        Worked out when needed, not kept per file: a walk's child process sends 10,000 entries
        through a pipe, and a second copy of each path in them doubled what it sent.
        """
        return self._source if self._source is not None else self.base + self.path

    def __repr__(self) -> str:
        return f"FileEntry({self.path!r}, size={self.size}, sha256={self.sha256[:12]!r})"

    def manifest_entry(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "mode": self.mode}



def _spec(lines: list[str], origin: str) -> pathspec.GitIgnoreSpec | None:
    if all(not line.rstrip() or line.startswith("#") for line in lines):
        return None  # blank lines and comments only, as pathspec reads them: no patterns, no need for pathspec
    import pathspec

    try:
        spec = pathspec.GitIgnoreSpec.from_lines(lines)
    except ValueError as exc:  # pathspec's pattern errors are ValueErrors that quote the pattern
        raise CloudctlError(f"{origin} has a pattern git would not accept: {exc}.") from None
    return spec if spec.patterns else None


def _read_spec(path: str, origin: str) -> pathspec.GitIgnoreSpec | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _spec(f.read().splitlines(), origin)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise CloudctlError(f"Cannot read {origin}: {exc.strerror}.") from None


class _Walker:
    """One walk of one tree; `specs` is the stack of ignore files from the root down to the current directory."""

    def __init__(self, root: str, excludes: Sequence[str]) -> None:
        self.root = root
        self.base = _base(root)
        self.excludes = _spec(list(excludes), "`job.excludes` in cloud.yaml") if excludes else None
        # (path, source, size, mtime_ns, mode); source is None for a file that is root + path (see FileEntry)
        self.entries: list[tuple[str, str | None, int, int, int]] = []

    def ignored(self, rel: str, is_dir: bool, specs: list[tuple[str, pathspec.GitIgnoreSpec]]) -> bool:
        """Git's rule: the deepest ignore file with a matching pattern decides, and in it the last match.

        `job.excludes` outranks every ignore file: it is what this project says about the cloud.
        """
        candidate = rel + "/" if is_dir else rel
        if self.excludes is not None:
            verdict = self.excludes.check_file(candidate).include
            if verdict is not None:
                return verdict
        for base, spec in reversed(specs):
            verdict = spec.check_file(candidate[len(base):]).include
            if verdict is not None:
                return verdict
        return False

    def walk(self) -> list[tuple[str, str | None, int, int, int]]:
        specs: list[tuple[str, pathspec.GitIgnoreSpec]] = []
        info_exclude = _read_spec(os.path.join(self.root, ".git", "info", "exclude"), ".git/info/exclude")
        if info_exclude is not None:
            specs.append(("", info_exclude))
        self._dir(self.root, "", specs, {self.root})
        self.entries.sort()  # by path: no two entries have the same
        return self.entries

    def _dir(self, directory: str, rel: str, specs: list[tuple[str, pathspec.GitIgnoreSpec]],
             ancestors: set[str]) -> None:
        prefix = rel + "/" if rel else ""
        # Listed and stat'ed through a descriptor of the directory: each stat is then relative to it,
        # not a walk of the whole path again (a fifth of a 10,000-file walk).
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise CloudctlError(f"Cannot read the directory {prefix or './'}: {exc.strerror}.") from None
        try:
            self._children(fd, directory, prefix, specs, ancestors)
        finally:
            os.close(fd)

    def _children(self, fd: int, directory: str, prefix: str, specs: list[tuple[str, pathspec.GitIgnoreSpec]],
                  ancestors: set[str]) -> None:
        try:
            with os.scandir(fd) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            raise CloudctlError(f"Cannot read the directory {prefix or './'}: {exc.strerror}.") from None
        base = directory if directory.endswith(os.sep) else directory + os.sep
        direct = base == self.base + prefix  # not below a linked directory: each file is root + its path
        names = {child.name for child in children}
        specs = list(specs)
        for name in IGNORE_FILES:
            spec = _read_spec(base + name, prefix + name) if name in names else None
            if spec is not None:
                specs.append((prefix, spec))
        filtered = bool(specs) or self.excludes is not None  # else nothing is ignored: skip the checks
        append = self.entries.append
        for child in children:
            name = child.name
            if name == ".git":  # a repository (or a submodule's .git file) is never part of a snapshot
                continue
            path = prefix + name
            try:
                if child.is_file(follow_symlinks=False):  # most are: asked first (not a link, which comes last)
                    if not filtered or not self.ignored(path, False, specs):
                        st = child.stat(follow_symlinks=False)
                        if direct and path.isascii() and "\\" not in path:  # what _add checks, for the usual file
                            append((path, None, st.st_size, st.st_mtime_ns, st.st_mode & 0o777))
                        else:
                            self._add(path, None if direct else base + name, st)
                elif child.is_dir(follow_symlinks=False):
                    if not filtered or not self.ignored(path, True, specs):
                        self._dir(base + name, path, specs, ancestors | {base + name})
                elif child.is_symlink():
                    self._link(base + name, path, specs, ancestors)
                # sockets, FIFOs and devices have no content to send
            except FileNotFoundError:
                continue  # deleted while we walked: it is simply not in this snapshot

    def _link(self, link: str, path: str, specs: list[tuple[str, pathspec.GitIgnoreSpec]],
              ancestors: set[str]) -> None:
        target = os.path.realpath(link)
        try:
            st = os.stat(target)
        except OSError:
            st = None
        is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        if self.ignored(path, is_dir, specs):
            return
        if st is None:
            raise CloudctlError(f"{path} is a broken symbolic link (to {os.readlink(link)}); remove it or add "
                                f"it to .cloudignore.")
        if target != self.root and not target.startswith(self.root + os.sep):
            raise CloudctlError(f"{path} is a symbolic link to {target}, outside the project, so it cannot be synced; "
                                f"copy what it points to into the project or add the link to .cloudignore.")
        if is_dir:
            if target in ancestors:
                raise CloudctlError(f"{path} is a symbolic link to one of its own parent directories (a loop); "
                                    f"add it to .cloudignore.")
            self._dir(target, path, specs, ancestors | {target})
        elif stat.S_ISREG(st.st_mode):
            self._add(path, target, st)

    def _add(self, path: str, source: str | None, st: os.stat_result) -> None:
        if not path.isascii():
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                shown = path.encode("utf-8", "backslashreplace").decode("utf-8")
                raise CloudctlError(f"{shown} has a name that is not valid UTF-8, which a snapshot path cannot be; "
                                    f"rename it or add it to .cloudignore.") from None
        if "\\" in path:
            raise CloudctlError(f"{path} has a backslash in its name, which a snapshot path cannot hold; rename it or "
                                f"add it to .cloudignore.")
        self.entries.append((path, source, st.st_size, st.st_mtime_ns, st.st_mode & 0o777))


def walk_project(root: str | Path, excludes: Sequence[str] = ()) -> list[FileEntry]:
    """The files a snapshot of `root` holds, sorted by path. Raises CloudctlError for a link it may not follow."""
    return _entries(os.path.realpath(root), _walk(root, excludes))


def _base(root: str) -> str:
    return root if root.endswith(os.sep) else root + os.sep


def _entries(real_root: str, walked: list[tuple[str, str | None, int, int, int]]) -> list[FileEntry]:
    base = _base(real_root)
    return [FileEntry(*entry, "", base) for entry in walked]


def _walk(root: str | Path, excludes: Sequence[str]) -> list[tuple[str, str | None, int, int, int]]:
    real = os.path.realpath(root)
    if not os.path.isdir(real):
        raise CloudctlError(f"{root} is not a directory.")
    return _Walker(real, excludes).walk()


def _project_to_walk(file: str | Path | None) -> tuple[Project | None, str, list[str]]:
    """The project of `cloudctl sync [-f FILE]` (cloud.yaml, if any), the root to walk and its excludes."""
    from cloudctl.project import load_project

    if file is not None:
        from pathlib import Path

        file = Path(file)
    project = load_project(file, required=file is not None)
    if project is None:
        return None, os.getcwd(), []
    return project, str(project.root), list(project.job.excludes)


class PendingWalk:
    """The walk of `cloudctl sync`'s project in a forked child, started as soon as the project is known.

    The child walks `root` with `excludes`, sends them and the entries (or the message of the
    CloudctlError the walk met) marshalled through a pipe, and exits. The parent meanwhile imports
    the rest of cloudctl and reads the hash cache, then `result(root, excludes)` takes the child's
    entries if it walked that same root with those same excludes. Where there is no fork, or the
    child failed, the walk is done again here: the child only ever saves time.
    """

    def __init__(self, root: str | Path, excludes: Sequence[str]) -> None:
        self.pid: int | None = None
        self.fd: int | None = None
        threading = sys.modules.get("threading")  # not imported: no other thread to be copied half-way
        if not hasattr(os, "fork") or (threading is not None and threading.active_count() > 1):
            return  # a forked child of a threaded process may find a lock held for ever: walk here
        try:
            read, write = os.pipe()
            pid = os.fork()
        except OSError:
            return
        if pid == 0:  # the child: walk, answer, and leave without running anything of the parent's
            code = 0
            try:
                os.close(read)
                real, wanted = os.path.realpath(root), list(excludes)
                try:
                    answer: Any = (real, wanted, "entries", _walk(root, excludes))
                except CloudctlError as exc:
                    answer = (real, wanted, "error", (exc.message, exc.details, exc.code))
                data = marshal.dumps(answer)
                _widen(write, len(data))
                view = memoryview(data)
                while view:
                    view = view[os.write(write, view):]
            except BaseException:  # a project it could not read, a closed pipe: the parent walks, or says why
                code = 1
            finally:
                os._exit(code)
        os.close(write)
        self.pid, self.fd = pid, read

    def result(self, root: str | Path, excludes: Sequence[str]) -> list[FileEntry]:
        answer = self._answer()
        if answer is None or answer[:2] != (os.path.realpath(root), list(excludes)):
            return walk_project(root, excludes)
        if answer[2] == "error":
            message, details, code = answer[3]
            raise CloudctlError(message, details, code=code)
        return _entries(answer[0], answer[3])

    def _answer(self) -> tuple | None:
        if self.fd is None:
            return None
        chunks = []
        try:
            while chunk := os.read(self.fd, 1 << 20):
                chunks.append(chunk)
        finally:
            status = self.close()
        if status != 0:
            return None
        try:
            answer = marshal.loads(b"".join(chunks))  # noqa: S302 - from our own child, through a private pipe
        except (EOFError, ValueError, TypeError):
            return None
        return answer if isinstance(answer, tuple) and len(answer) == 4 and answer[2] in ("entries", "error") else None

    def close(self) -> int | None:
        """Close the pipe (a child still at work then cannot answer, and exits) and reap the child; its exit status."""
        if self.fd is None or self.pid is None:
            return None
        os.close(self.fd)
        self.fd = None
        _, status = os.waitpid(self.pid, 0)
        return status


def _widen(pipe: int, size: int) -> None:
    """Let the pipe hold `size` bytes where the system allows (Linux, up to 1 MiB unprivileged), so that the child
    writes its answer at once and exits, instead of handing it over 64 KiB at a time as the parent reads."""
    try:
        import fcntl

        fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, min(size, 1 << 20))
    except (ImportError, AttributeError, OSError):
        pass


def start_walk(file: str | Path | None) -> tuple[Project | None, PendingWalk]:
    """`cloudctl sync [-f FILE]`: the project found (None: no cloud.yaml), and its walk started (PendingWalk)."""
    project, root, excludes = _project_to_walk(file)
    return project, PendingWalk(root, excludes)
