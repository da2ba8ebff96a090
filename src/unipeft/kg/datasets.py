"""Knowledge graphs: UMLS, Kinships and Nations read from the files bundled in the `pykeen` wheel."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import ConfigError, UnipeftError

DATASETS: tuple[str, ...] = ("umls", "kinships", "nations")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
INSTALL_HINT = "pip install 'unipeft[kg]'"


class MissingDependencyError(UnipeftError, ImportError):
    """An optional dependency (here: pykeen, for its bundled data files) is not installed."""


@dataclass
class KGDataset:
    """A knowledge graph: entity/relation names and (head, relation, tail) id triples per split.

    Relation ids are 0..R-1; query answering and the link predictor also use the reciprocal
    relation r + R ("r inverse"), so the predictor knows 2R relations.
    """

    name: str
    entities: list[str]
    relations: list[str]
    triples: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> LongTensor (n, 3)
    # Derived structures (graphs, grounding indexes) keyed by what they were built from.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_entities(self) -> int:
        """Number of entities N."""
        return len(self.entities)

    @property
    def n_relations(self) -> int:
        """Number of relations R, without reciprocals."""
        return len(self.relations)

    def graph(self, *splits: str) -> torch.Tensor:
        """Dense adjacency `adj[r, h, t]` (bool, 2R x N x N) of the union of `splits`, with reciprocals."""
        unknown = [s for s in splits if s not in self.triples]
        if unknown or not splits:
            raise ConfigError(f"KGDataset.graph: unknown split(s) {unknown or list(splits)}; "
                              f"available: {sorted(self.triples)}")
        n, r = self.n_entities, self.n_relations
        adj = torch.zeros(2 * r, n, n, dtype=torch.bool)
        for s in splits:
            h, rel, t = self.triples[s].unbind(1)
            adj[rel, h, t] = True
            adj[rel + r, t, h] = True
        return adj

    def summary(self) -> dict[str, int]:
        """Counts of entities, relations and triples per split."""
        return {"entities": self.n_entities, "relations": self.n_relations,
                **{s: int(t.shape[0]) for s, t in self.triples.items()}}


def from_triples(name: str, splits: dict[str, list[tuple[str, str, str]]]) -> KGDataset:
    """Build a KGDataset from named triples per split (ids assigned in sorted name order)."""
    ents = sorted({x for rows in splits.values() for h, _, t in rows for x in (h, t)})
    rels = sorted({r for rows in splits.values() for _, r, _ in rows})
    e_id = {e: i for i, e in enumerate(ents)}
    r_id = {r: i for i, r in enumerate(rels)}
    data = KGDataset(name, ents, rels)
    for split, rows in splits.items():
        ids = [(e_id[h], r_id[r], e_id[t]) for h, r, t in rows]
        data.triples[split] = torch.tensor(ids, dtype=torch.long).reshape(-1, 3)
    return data


def pykeen_dataset_dir(name: str) -> Path:
    """The folder of `name` inside the installed pykeen package (pykeen itself is not imported)."""
    key = name.lower()
    if key not in DATASETS:
        raise ConfigError(f"unknown knowledge graph {name!r}; valid names: {', '.join(DATASETS)}")
    spec = importlib.util.find_spec("pykeen")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the {name} data files come with the pykeen package, which is not "
                                     f"installed; run: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / key
    missing = [s for s in SPLITS if not (folder / f"{s}.txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {[s + '.txt' for s in missing]}: this pykeen version does not "
                                f"bundle the {key} files; run: {INSTALL_HINT}")
    return folder


def _read_tsv(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields (head, relation, tail), "
                             f"got {len(parts)}")
        rows.append((parts[0], parts[1], parts[2]))
    return rows


def load_dataset(name: str) -> KGDataset:
    """Load UMLS, Kinships or Nations (case-insensitive) from the pykeen wheel's bundled files."""
    folder = pykeen_dataset_dir(name)
    return from_triples(name.lower(), {s: _read_tsv(folder / f"{s}.txt") for s in SPLITS})
