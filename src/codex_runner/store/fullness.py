"""Whether the database's disk is full, per engine: from a write that a full disk refused until a
write lands again.

Reads go on while the disk is full, so an answered read says nothing about it: `/readyz` and the
launcher's outage log ask this instead. Only a committed transaction that changed rows ends it (a
claim that found nothing to claim, or any read, commits fine on a full disk). Every instance
writes its registry row at each heartbeat, so a full disk that has room again is noticed within
a heartbeat period even when no request comes."""

from __future__ import annotations

import weakref

from sqlalchemy.engine import Engine

#: The engines a full disk refused a write of, none of whose writes has landed since.
_full: weakref.WeakSet[Engine] = weakref.WeakSet()


def refused(engine: Engine) -> None:
    """A write of `engine`'s was refused for want of room (SQLITE_FULL, PostgreSQL's disk_full)."""
    _full.add(engine)


def landed(engine: Engine) -> None:
    """A write of `engine`'s that changed rows committed: there is room again."""
    _full.discard(engine)


def disk_full(engine: Engine) -> bool:
    return engine in _full
