"""One small registry class behind every extension point (data sets, agents, rewards).

A registry maps names (and aliases) to entries. Extensions register themselves in their own file,
with a decorator or a call, and every reader (the envs, training, the CLI and the docs) asks the
same registry, so adding an entry touches no other file::

    REWARDS: Registry[RewardFn] = Registry("reward")

    @REWARDS.register("dense")
    def dense(before, after): ...

    REWARDS.get("dense")   # the function; an unknown name raises ValueError listing the known ones

``subscribe`` lets a higher layer react to entries registered before or after it is imported (the
envs register one Gymnasium id per data set this way), so the core never imports upward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries of one kind.

    Args:
        kind: what an entry is, for error messages ("data set", "agent", "reward").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._listeners: list[Callable[[str, T], None]] = []

    @overload
    def register(self, name: str, entry: T, *, aliases: tuple[str, ...] = ()) -> T: ...

    @overload
    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]: ...

    def register(self, name: str, entry: T | None = None, *, aliases: tuple[str, ...] = ()) -> T | Callable[[T], T]:
        """Add ``entry`` under ``name`` (and ``aliases``); without ``entry``, a decorator that does it.

        Raises:
            ValueError: ``name`` or an alias is already taken (re-registering the same entry is a no-op).
        """

        def add(obj: T) -> T:
            for key in (name, *aliases):
                if not isinstance(key, str) or not key:
                    raise ValueError(f"a {self.kind} name must be a non-empty string, got {key!r}")
                taken = self._entries.get(self._aliases.get(key, key))
                if taken is not None and taken is not obj:
                    raise ValueError(f"{self.kind} {key!r} is already registered: choose another name")
            fresh = name not in self._entries
            self._entries[name] = obj
            self._aliases.update({alias: name for alias in aliases})
            if fresh:
                for listener in self._listeners:
                    listener(name, obj)
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        """The entry for ``name`` or one of its aliases.

        Raises:
            ValueError: unknown name; the message lists the registered ones.
        """
        key = self._aliases.get(name, name) if isinstance(name, str) else name
        if not isinstance(key, str) or key not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}: choose one of {self.names()}")
        return self._entries[key]

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (itself, or what the alias points to)."""
        self.get(name)
        return self._aliases.get(name, name)

    def names(self) -> list[str]:
        """Registered names in registration order (aliases left out)."""
        return list(self._entries)

    def subscribe(self, listener: Callable[[str, T], None]) -> None:
        """Call ``listener(name, entry)`` for every entry now and for each one registered later."""
        self._listeners.append(listener)
        for name, entry in list(self._entries.items()):
            listener(name, entry)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name, name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
