"""Requests waiting for their first (or, after preemption, next) scheduling, served round-robin across groups.

A group is the user request a sample belongs to (the `n` children of one request share it; any other request
is its own group). Taking turns between groups keeps one request with a large `n` from holding every free
sequence slot while other clients' requests wait behind thousands of its samples. With one request per
group this is exactly first-come-first-served. Every operation is O(1) (remove: O(size of the group))."""
from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator

from hfbridge.core.request import Request


class WaitingQueue:
    def __init__(self):
        # group id -> its waiting requests in order; the dict's order is the groups' turn order
        self._groups: OrderedDict[str, deque[Request]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Request]:
        for queue in list(self._groups.values()):
            yield from list(queue)

    def __contains__(self, request: Request) -> bool:
        queue = self._groups.get(request.group_id)
        return queue is not None and any(r is request for r in queue)

    def append(self, request: Request) -> None:
        """A new request: last in its group; a new group takes its turn after every waiting group."""
        self._groups.setdefault(request.group_id, deque()).append(request)
        self._size += 1

    def appendleft(self, request: Request) -> None:
        """A preempted request: first of its group, and its group first in turn (it was running already)."""
        queue = self._groups.setdefault(request.group_id, deque())
        queue.appendleft(request)
        self._groups.move_to_end(request.group_id, last=False)
        self._size += 1

    def peek(self) -> Request:
        """The request whose turn it is."""
        return next(iter(self._groups.values()))[0]

    def pop(self) -> Request:
        """Take the request whose turn it is; its group goes to the end of the turn order."""
        group_id, queue = next(iter(self._groups.items()))
        request = queue.popleft()
        if queue:
            self._groups.move_to_end(group_id)
        else:
            del self._groups[group_id]
        self._size -= 1
        return request

    def remove_many(self, requests: list[Request]) -> None:
        """Remove requests (each must be waiting); one pass over each touched group."""
        by_group: dict[str, set[int]] = {}
        for request in requests:
            by_group.setdefault(request.group_id, set()).add(id(request))
        for group_id, ids in by_group.items():
            queue = self._groups[group_id]
            kept = deque(r for r in queue if id(r) not in ids)
            self._size -= len(queue) - len(kept)
            if kept:
                self._groups[group_id] = kept
            else:
                del self._groups[group_id]


class PriorityWaitingQueue:
    """vLLM's priority policy: the lowest (priority, arrival time) goes first; ties in arrival keep insertion
    order. A sorted list: inserts are O(n) memmoves, fine at the queue sizes a server admits."""

    def __init__(self):
        self._entries: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[Request]:
        return iter([entry[-1] for entry in self._entries])

    def __contains__(self, request: Request) -> bool:
        return any(entry[-1] is request for entry in self._entries)

    def append(self, request: Request) -> None:
        bisect.insort(self._entries, (request.priority, request.arrival_time, next(self._counter), request),
                      key=lambda entry: entry[:3])

    appendleft = append  # a preempted request keeps its place by priority and arrival

    def peek(self) -> Request:
        return self._entries[0][-1]

    def pop(self) -> Request:
        return self._entries.pop(0)[-1]

    def remove_many(self, requests: list[Request]) -> None:
        ids = {id(r) for r in requests}
        self._entries = [entry for entry in self._entries if id(entry[-1]) not in ids]


WAITING_QUEUES = {"fcfs": WaitingQueue, "priority": PriorityWaitingQueue}
