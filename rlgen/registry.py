"""A name -> item registry per extension point, remembering who provided each item."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

from rlgen.errors import RlgenError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    item: T
    provider: str
    description: str = ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, item: T, provider: str, description: str = "") -> None:
        if name in self._entries:
            other = self._entries[name].provider
            raise RlgenError(
                f"{self.kind} '{name}' is registered twice: by package '{other}' and by package '{provider}'"
            )
        self._entries[name] = Entry(name, item, provider, description)

    def get(self, name: str) -> T:
        try:
            return self._entries[name].item
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RlgenError(f"unknown {self.kind} '{name}' (known: {known})") from None

    def entry(self, name: str) -> Entry[T]:
        self.get(name)
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


def describe(obj: Any) -> str:
    doc = getattr(obj, "description", None) or getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
