"""Host-memory slots that swapped-out sequences keep their KV blocks in."""

from __future__ import annotations

from collections import deque


class SwapSpace:
    """``num_host_blocks`` host slots (ids ``0 .. num_host_blocks-1``), owned by sequence id."""

    def __init__(self, num_host_blocks: int) -> None:
        if not isinstance(num_host_blocks, int) or num_host_blocks < 0:
            raise ValueError(f"num_host_blocks={num_host_blocks!r}: must be an int >= 0")
        self.num_host_blocks = num_host_blocks
        self._free: deque[int] = deque(range(num_host_blocks))
        self._owned: dict[str, list[int]] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self, owner: str, n: int) -> list[int] | None:
        """``n`` slots for ``owner`` (who holds none), or None and no change if too few."""
        if owner in self._owned:
            raise ValueError(f"swap space: {owner!r} already holds host slots")
        if n > len(self._free):
            return None
        slots = [self._free.popleft() for _ in range(n)]
        self._owned[owner] = slots
        return list(slots)

    def slots(self, owner: str) -> list[int]:
        return list(self._owned.get(owner, ()))

    def free(self, owner: str) -> list[int]:
        """Give back ``owner``'s slots (none is fine); returns them."""
        slots = self._owned.pop(owner, [])
        self._free.extend(slots)
        return slots
