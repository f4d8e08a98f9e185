"""Data mixtures: several sources' token blocks in one training set, each step's examples drawn by weight.

The training blocks of the components lie one after another (``data/blocks.safetensors``); which rows
belong to which component, and their weights, are in ``data/mixture.json``. Every example slot ``g``
of the run (step ``s`` holds slots ``s * per_step ... (s + 1) * per_step - 1``) draws its component
from the weights with a generator seeded by the seed and ``g // CHUNK``; within a component the slots
walk a seeded permutation per epoch, as ``step_indices`` does for one source. So a step's batch is a
pure function of (seed, step): a resumed run reads exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 4096  # slots whose components are drawn together, and cached


def epoch_slice(start: int, count: int, n: int, seed: int) -> torch.Tensor:
    """Positions ``start .. start + count - 1`` of an endless walk over ``range(n)``: consecutive slices
    of a permutation per epoch, seeded by the seed and the epoch."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset: offset + count - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


@dataclass
class Component:
    name: str
    weight: float
    start: int  # its training rows: start .. start + size - 1
    size: int


class MixtureSampler:
    """Training-example indices of a step, drawn from ``components`` by weight (see the module's doc)."""

    def __init__(self, components: list[Component], seed: int):
        if not components:
            raise ValueError("a mixture needs at least one component")
        for c in components:
            if not c.weight > 0:
                raise ValueError(f"mixture component {c.name!r}: weight must be > 0 (got {c.weight})")
            if c.size < 1:
                raise ValueError(f"mixture component {c.name!r}: no training blocks")
        self.components, self.seed = components, seed
        self.weights = torch.tensor([c.weight for c in components], dtype=torch.float64)
        self._chunks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._before = [torch.zeros(len(components), dtype=torch.long)]  # counts in chunks < c

    def _chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the component of each slot of chunk ``c``, how many slots of that component came before it in
        the run, the chunk's count of each component)."""
        if c not in self._chunks:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
            comp = torch.multinomial(self.weights, CHUNK, replacement=True, generator=g)
            onehot = torch.nn.functional.one_hot(comp, len(self.components))
            while len(self._before) <= c:
                prev = len(self._before) - 1
                self._before.append(self._before[prev] + self._chunk(prev)[2])
            prior = self._before[c] + onehot.cumsum(0) - onehot  # counts before each slot, this chunk included
            if len(self._chunks) > 8:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[c] = (comp, prior.gather(1, comp[:, None])[:, 0], onehot.sum(0))
        return self._chunks[c]

    def slots(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(component, position within that component's walk) of slots ``start .. start + count - 1``."""
        comps, pos = [], []
        g = start
        while g < start + count:
            c, o = divmod(g, CHUNK)
            take = min(CHUNK - o, start + count - g)
            comp, prior, _ = self._chunk(c)
            comps.append(comp[o:o + take])
            pos.append(prior[o:o + take])
            g += take
        return torch.cat(comps), torch.cat(pos)

    def indices(self, step: int, per_step: int) -> torch.Tensor:
        """Row indices of the ``per_step`` examples of optimiser step ``step``."""
        comp, pos = self.slots(step * per_step, per_step)
        out = torch.empty(per_step, dtype=torch.long)
        for k, c in enumerate(self.components):
            mine = (comp == k).nonzero()[:, 0]
            if len(mine):  # a component's positions in one step are consecutive: one slice of its walk
                out[mine] = c.start + epoch_slice(int(pos[mine[0]]), len(mine), c.size, self.seed * 1009 + k)
        return out

    def component_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The component index of each training row."""
        bounds = torch.tensor([c.start + c.size for c in self.components])
        return torch.bucketize(rows, bounds, right=True)

    @classmethod
    def from_info(cls, info: dict, seed: int) -> "MixtureSampler":
        """From ``data/mixture.json`` (see :func:`build`)."""
        return cls([Component(c["name"], c["weight"], *c["train_rows"]) for c in info["components"]], seed)


def interleave(sizes: list[int], weights: list[float]) -> list[tuple[int, int]]:
    """``(component, its row)`` in an order that keeps every prefix close to the weights (smooth weighted
    round robin), so the first N held-out blocks sample every component."""
    taken, order, total, wsum = [0] * len(sizes), [], sum(sizes), sum(weights)
    while len(order) < total:
        live = [k for k in range(len(sizes)) if taken[k] < sizes[k]]
        k = max(live, key=lambda k: weights[k] / wsum * (len(order) + 1) - taken[k])
        order.append((k, taken[k]))
        taken[k] += 1
    return order


def build(parts: list[tuple[str, float, dict[str, torch.Tensor], dict[str, torch.Tensor], int]],
          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """One training and one held-out set from the components ``(name, weight, train, heldout, documents)``:
    the training rows one component after another, the held-out rows interleaved by weight. Returns
    ``(train, heldout, info)``, ``info`` being what ``data/mixture.json`` holds."""
    total = sum(w for _, w, *_ in parts)
    keys = list(parts[0][2])
    train = {k: torch.cat([p[2][k] for p in parts]) for k in keys}
    order = interleave([len(p[3]["input_ids"]) for p in parts], [w for _, w, *_ in parts])
    heldout = {k: torch.stack([parts[c][3][k][i] for c, i in order]) for k in keys}
    info, start = {"components": []}, 0
    for k, (name, weight, tr, held, docs) in enumerate(parts):
        n = len(tr["input_ids"])
        info["components"].append({
            "name": name, "weight": weight, "share": weight / total, "documents": docs,
            "train_rows": [start, n], "train_blocks": n, "heldout_blocks": len(held["input_ids"]),
            "heldout_rows": [j for j, (c, _) in enumerate(order) if c == k]})
        start += n
    return train, heldout, info


def first_drawn(rows: torch.Tensor, info: dict | None, seed: int, n: int) -> torch.Tensor:
    """The first ``n`` training rows a run draws, e.g. to calibrate on: the first ``n``, or for a mixture
    (``info``, see :func:`build`) the first ``n`` the sampler draws (the rows lie component after
    component: the head is one component)."""
    if info is None:
        return rows[:n]
    return rows[MixtureSampler.from_info(info, seed).indices(0, min(n, len(rows)))]


def heldout_of(info: dict, heldout: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The held-out rows of one component."""
    comp = next(c for c in info["components"] if c["name"] == name)
    rows = torch.tensor(comp["heldout_rows"], dtype=torch.long)
    return {k: v[rows] for k, v in heldout.items()}
