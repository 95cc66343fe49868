"""Instruction examples and the federated dataset that maps client ids to their splits.

A *seen* client trains; an *unseen* client is held out for zero-shot evaluation and has no
training data at all (its train part is dropped when the dataset is built), so no code path can
train on it by mistake.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flexlora.errors import UsageError

__all__ = ["ClientSplit", "Example", "FederatedDataset"]


@dataclass(frozen=True, slots=True)
class Example:
    """One instruction-following example.

    ``output`` is the target (for Natural Instructions, the first acceptable answer);
    ``category`` is the label the Dirichlet and meta partitioners use; ``task`` the task it came
    from ("" when the source has no tasks) and ``id`` a stable identifier within the source.
    Examples of one task share one ``instruction`` string object, so a long task definition is
    stored once.
    """

    instruction: str
    input: str
    output: str
    category: str
    task: str = ""
    id: str = ""


@dataclass(frozen=True, slots=True)
class ClientSplit:
    """One client's train / eval / test examples (train is empty for an unseen client)."""

    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    test: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.train) + len(self.eval) + len(self.test)


class FederatedDataset:
    """Client id -> :class:`ClientSplit`, with the seen / unseen partition of the clients.

    ``clients`` keeps the build order (deterministic: sorted task names, or client index);
    ``seen`` and ``unseen`` are disjoint and cover ``clients``. ``train(cid)`` refuses an
    unseen client; ``eval`` and ``test`` serve both kinds.
    """

    def __init__(
        self,
        splits: Mapping[str, ClientSplit],
        unseen: Iterable[str] = (),
        *,
        name: str = "",
        template: object = None,
    ) -> None:
        self._splits = dict(splits)
        unseen_set = set(unseen)
        unknown = sorted(unseen_set - self._splits.keys())
        if unknown:
            raise UsageError(f"unseen clients not in the dataset: {', '.join(unknown[:5])}")
        leaking = sorted(c for c in unseen_set if self._splits[c].train)
        if leaking:
            raise UsageError(f"unseen clients must have no training data: {', '.join(leaking[:5])}")
        self.clients: tuple[str, ...] = tuple(self._splits)
        self.unseen: tuple[str, ...] = tuple(c for c in self.clients if c in unseen_set)
        self.seen: tuple[str, ...] = tuple(c for c in self.clients if c not in unseen_set)
        self._unseen_set = frozenset(unseen_set)
        self.name = name
        #: the resolved prompt template (a ``PromptTemplate``) for ``render_prompt``
        self.template = template

    def __len__(self) -> int:
        return len(self.clients)

    def __contains__(self, cid: object) -> bool:
        return cid in self._splits

    def __repr__(self) -> str:
        return (
            f"FederatedDataset({self.name!r}, clients={len(self.clients)}, "
            f"seen={len(self.seen)}, unseen={len(self.unseen)})"
        )

    def split(self, cid: str) -> ClientSplit:
        """The client's three lists; ``UsageError`` for an unknown id."""
        try:
            return self._splits[cid]
        except KeyError:
            raise UsageError(f"unknown client {cid!r}") from None

    def train(self, cid: str) -> Sequence[Example]:
        """Training examples of a seen client (an unseen client has none and raises)."""
        split = self.split(cid)
        if cid in self._unseen_set:
            raise UsageError(f"client {cid!r} is unseen (held out for zero-shot evaluation)")
        return split.train

    def eval(self, cid: str) -> Sequence[Example]:
        """Validation examples (seen or unseen client)."""
        return self.split(cid).eval

    def test(self, cid: str) -> Sequence[Example]:
        """Test examples (seen or unseen client)."""
        return self.split(cid).test

    def num_train_examples(self, cid: str) -> int:
        """Aggregation weight n_i of a seen client."""
        return len(self.train(cid))
