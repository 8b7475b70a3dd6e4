"""Direct routes: the model versions a frontend may send straight to a backend host.

The scheduler publishes the whole table (``Routes``) whenever it changes: for each model
version that needs no scheduling decision (Triton's default scheduler, or a plain dynamic
batcher, which the host applies), its signature and its instances. A frontend then checks
a request against the signature itself and sends it to the least busy instance whose
host has a link to it, the least recently picked among equals, so that even a client
sending one request at a time alternates over the hosts (docs/architecture.md, "Two
request paths").
"""

from __future__ import annotations

from despina.common import messages as m


class Target:
    """One model instance a direct route may use, with this frontend's requests on it
    and when it was last picked (``DirectRoutes.picks`` then)."""

    __slots__ = ("host_id", "index", "outstanding", "picked")

    def __init__(self, host_id: str, index: int, outstanding: int = 0) -> None:
        self.host_id = host_id
        self.index = index
        self.outstanding = outstanding
        self.picked = 0


class DirectRoutes:
    """(model, version or "" for the default) -> (its route, its instances)."""

    __slots__ = ("table", "picks")

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], tuple[m.Route, list[Target]]] = {}
        self.picks = 0  # picks so far: the clock of ``Target.picked``

    def update(self, msg: m.Routes) -> None:
        """The scheduler's whole table; instances that stay keep their counts."""
        known = {(t.host_id, t.index): t for _, targets in self.table.values() for t in targets}
        table: dict[tuple[str, str], tuple[m.Route, list[Target]]] = {}
        for route in msg.routes:
            targets = [known.get((h, i)) or Target(h, i) for h, i in route.instances]
            table[(route.model, route.version)] = (route, targets)
            if route.default:
                table[(route.model, "")] = (route, targets)
        self.table = table

    def forget(self) -> None:
        """The scheduler is gone: route nothing directly until the next one says what is
        there."""
        self.table = {}

    def pick(self, model: str, version: str, links: dict) -> tuple[m.Route, Target] | None:
        """The route and the instance with the fewest of this frontend's requests among
        those whose host has a link here, the least recently picked of them on a tie
        (round-robin among equals); None when there is no route or no such host (the
        request then goes through the scheduler)."""
        found = self.table.get((model, version))
        if found is None:
            return None
        best = None
        for target in found[1]:
            if target.host_id in links and (
                best is None
                or target.outstanding < best.outstanding
                or (target.outstanding == best.outstanding and target.picked < best.picked)
            ):
                best = target
        if best is None:
            return None
        self.picks += 1
        best.picked = self.picks
        return found[0], best
