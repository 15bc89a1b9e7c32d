"""Telling that a git command waits to open a named pipe (FIFO) nothing will ever open from the
other side, and which one: an agent can put a FIFO wherever git opens a file by name (a
`.gitignore` in any folder, `.git/config`, `info/exclude`, `packed-refs`, a path its config
includes), and `open()` of a FIFO blocks until a partner opens it too. Without this the
runner's git sat there until its timeout (10 min), then failed with a bare "timed out".

Linux only, read from /proc; where it cannot tell (another kernel, /proc hidden) it answers
None and the command's timeout remains the bound."""

from __future__ import annotations

import contextlib
import os
import platform

from codex_runner.execution.process import group_pids

__all__ = ["fifo_wait"]

#: What /proc/<pid>/wchan names while `open()` of a FIFO waits for the other side (fs/pipe.c:
#: fifo_open -> wait_for_partner, since Linux 3.x). The runner's git never waits there for a good
#: reason: it talks to its helpers (remote-https, ssh, the credential helper) through anonymous
#: pipes and sockets, which wait elsewhere.
_FIFO_WAIT = "wait_for_partner"

#: The argument holding the path, by open-like system call number (/proc/<pid>/syscall).
_PATH_ARG = {
    "x86_64": {2: 0, 85: 0, 257: 1, 437: 1},  # open, creat, openat, openat2
    "aarch64": {56: 1, 437: 1},  # openat, openat2
}.get(platform.machine(), {})

_PATH_MAX = 4096
_AT_FDCWD = -100 & 0xFFFFFFFF


def fifo_wait(group: int) -> str | None:
    """If a process of the process group `group` leads (a git command and what it started) waits to
    open a named pipe: the pipe's path as that process named it (a relative one made absolute),
    or "" when it cannot be read; else None."""
    for pid in _members(group):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/wchan") as fh:
                if fh.read().strip() != _FIFO_WAIT:
                    continue
            return _opened_path(pid) or ""
    return None


def _members(group: int) -> list[int]:
    """`group`'s leader and its descendants, from the kernel's list of each task's children (a
    handful of reads, where a look at every process's stat costs one per process on the host);
    where that list is missing (a kernel built without it), every process whose group is `group`."""
    if not os.path.exists(f"/proc/{group}/task/{group}/children"):
        return group_pids(group)
    found, todo = [], [group]
    while todo:
        pid = todo.pop()
        found.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with (
                    contextlib.suppress(OSError, ValueError),
                    open(f"/proc/{pid}/task/{task}/children") as fh,
                ):
                    todo.extend(int(child) for child in fh.read().split())
    return found


def _opened_path(pid: int) -> str | None:
    """The path the blocked `open()` names, read from the process's memory (our own child, same
    user: readable where ptrace would be). None where the call or the memory cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/syscall") as fh:
            fields = fh.read().split()
        arg = _PATH_ARG.get(int(fields[0]))
        if arg is None:
            return None
        address = int(fields[1 + arg], 16)
        raw = b""
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            while b"\0" not in raw and len(raw) < _PATH_MAX:
                mem.seek(address + len(raw))
                # Up to the end of the page only: the next one may not be mapped.
                chunk = mem.read(4096 - (address + len(raw)) % 4096)
                if not chunk:
                    break
                raw += chunk
        path = os.fsdecode(raw.split(b"\0", 1)[0])
        if path and not path.startswith("/"):
            # Relative to the folder an openat() names, or to the current one (AT_FDCWD, -100).
            dirfd = int(fields[1], 16) if arg == 1 else _AT_FDCWD
            base = f"/proc/{pid}/cwd" if dirfd & 0xFFFFFFFF == _AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
            path = os.path.join(os.readlink(base), path)
        return path or None
    return None
