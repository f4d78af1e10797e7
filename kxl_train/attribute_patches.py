"""Attributes of sd-scripts' modules and classes replaced at run time, and put back.

The patches (kxl_train.dataset, kxl_train.resume) replace through one of these so uninstall()
restores exactly what was there (tests install and uninstall several set-ups in one process).
"""
from __future__ import annotations

_ABSENT = object()


class AttributePatches:
    def __init__(self) -> None:
        self.restore: list[tuple[object, str, object]] = []

    def replace(self, owner, name: str, value) -> None:
        # a class's own attribute only: one it inherits is restored by deleting the override
        previous = owner.__dict__.get(name, _ABSENT) if isinstance(owner, type) else getattr(owner, name, _ABSENT)
        self.restore.append((owner, name, previous))
        setattr(owner, name, value)

    def uninstall(self) -> None:
        """Undo every replacement, the last first."""
        while self.restore:
            owner, name, value = self.restore.pop()
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
