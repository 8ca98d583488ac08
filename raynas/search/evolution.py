"""AutoTinyBERT's evolutionary search (Algorithm 2), for several budgets sharing one archive of evaluations.

Algorithm 2: generation 1 is sampled from the space; each later generation of
``S`` is filled by drawing a parent from the previous generation by roulette
on its fitness, mutating it with probability ``p_m`` and, independently,
sampling a fresh arch with probability ``p_e``; the newly generated archs join
the generation. Here:

- **Budgets share evaluations.** Each generation holds ``S`` candidates *per
  budget*, each generated for (and within) one budget; an evaluation serves
  every budget its cost fits, so a parent for budget ``b`` is any arch of the
  previous generation that fits ``b``, whichever budget it was generated for.
- **Filtered before evaluation.** A candidate is kept only if its predicted cost
  fits the budget it is generated for and no arch is evaluated twice; draws are
  bounded (``max_attempts`` per wanted candidate). Where a budget is so tight that
  draws find too few feasible archs, the rest come from mutating feasible archs
  (the space's smallest included: a budget never admits less).
- **Fitness** is the validation loss (lower is better). Roulette weights are
  ``exp(-(loss - min_loss) / std(loss))`` over the parents: invariant to shifting
  and scaling the losses, never zero (every parent can be drawn), and a parent
  one standard deviation worse is drawn ``1/e`` as often as the best.
- ``strategy="random"``: the same number of candidates per budget and
  generation, each a uniform sample of the space that fits (rejection sampling);
  ``strategy="fast"``: AutoTinyBERT-Fast, one candidate per layer count per
  budget under the rule 1.6 d_m <= d_f <= 1.9 d_m, 0.7 d_m <= d_qkv <= d_m.

It is an ask/tell object (an evaluator asks for candidates, tells their losses)
so the Ray Tune ``Searcher`` adapter and tests drive the same code. Every
generation is a function of ``(seed, generation number, losses of the archs
before it)`` only -- not of the order results arrive in -- so :meth:`replay` of
stored rows rebuilds the exact state of an interrupted search. Pure python.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from raynas.errors import ConfigError
from raynas.search.constraints import Budget
from raynas.spaces import HomogeneousSpace, Space, TinyArch

STRATEGIES = ("evolution", "random", "fast")
MAX_RETRIES = 1  # a failed evaluation is retried once, then dropped
FAST_DF = (1.6, 1.9)  # AutoTinyBERT-Fast: d_f / d_m
FAST_DQKV = (0.7, 1.0)  # d_qkv / d_m
Costs = Callable[[Sequence[str]], list[float]]


@dataclass
class Candidate:
    """An arch generated for one budget in one generation, with its predicted cost and how it was made."""

    arch: str
    budget: str
    generation: int
    origin: str  # initial | mutation | exploration | random | fast | fallback
    cost: float


def roulette_weights(losses: Sequence[float]) -> list[float]:
    """Selection weights from losses (lower loss, larger weight); see the module docstring. Non-finite: weight 0."""
    finite = [x for x in losses if math.isfinite(x)]
    if not finite:
        return [1.0] * len(losses)
    low = min(finite)
    scale = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    if scale == 0.0:
        return [1.0 if math.isfinite(x) else 0.0 for x in losses]
    return [math.exp(-(x - low) / scale) if math.isfinite(x) else 0.0 for x in losses]


def roulette(weights: Sequence[float], rng: random.Random) -> int:
    """Index drawn with probability proportional to its weight (the Russian roulette of Algorithm 2)."""
    total = sum(weights)
    r = rng.random() * total
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if r < acc:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)


class EvolutionSearch:
    """Ask for candidates, tell their losses; generations advance when every candidate of one is told."""

    def __init__(self, space: Space, costs: Costs, budgets: Sequence[Budget], *, strategy: str = "evolution",
                 generations: int = 4, population: int = 25, mutation_prob: float = 0.5,
                 exploration_prob: float = 0.5, gene_prob: float = 0.2, seed: int = 0, max_attempts: int = 100) -> None:
        problems = []
        if strategy not in STRATEGIES:
            problems.append(f"strategy: {strategy!r} is not one of {list(STRATEGIES)}")
        for name, value in (("generations", generations), ("population", population), ("max_attempts", max_attempts)):
            if value < 1:
                problems.append(f"{name}: expected >= 1, got {value}")
        for name, value in (("mutation_prob", mutation_prob), ("exploration_prob", exploration_prob),
                            ("gene_prob", gene_prob)):
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}: expected in [0, 1], got {value}")
        if not budgets:
            problems.append("budgets: give at least one")
        if strategy == "fast" and not isinstance(space, HomogeneousSpace):
            problems.append(f"strategy fast: the AutoTinyBERT-Fast rule needs a homogeneous space "
                            f"(space {space.name!r} is {space.kind})")
        elif strategy == "fast" and not any(fast_rule_archs(space, space.dims["layers"].min, d)
                                            for d in space.dims["hidden"].values):
            problems.append(f"strategy fast: no arch of space {space.name!r} follows the rule "
                            "1.6 d_m <= d_f <= 1.9 d_m, 0.7 d_m <= d_qkv <= d_m")
        if problems:
            raise ConfigError("search: " + "; ".join(problems))
        self.space, self._costs, self.budgets = space, costs, list(budgets)
        self.strategy, self.generations, self.population = strategy, generations, population
        self.mutation_prob, self.exploration_prob, self.gene_prob = mutation_prob, exploration_prob, gene_prob
        self.seed, self.max_attempts = seed, max_attempts
        self.generation = 0
        self.history: list[list[str]] = []  # archs of each generation, in generation order
        self.archive: dict[str, dict[str, Any]] = {}  # arch -> Candidate fields + loss
        self.dropped: list[str] = []  # failed twice: never evaluated, never generated again
        self.stats: Counter[str] = Counter()
        self._queue: list[Candidate] = []
        self._pending: dict[str, Candidate] = {}
        self._failures: Counter[str] = Counter()
        self._exhausted = False
        self._advance()

    # ---- the ask / tell protocol -------------------------------------------------------
    @property
    def last_generation(self) -> int:
        return 1 if self.strategy == "fast" else self.generations

    @property
    def done(self) -> bool:
        """No candidate left to ask or wait for, and no generation left to make."""
        return not self._queue and not self._pending and (self._exhausted or self.generation >= self.last_generation)

    @property
    def planned(self) -> int:
        """Evaluations a complete search makes (fewer where a budget's feasible archs run out)."""
        if self.strategy == "fast":
            return len(self.history[0]) if self.history else 0
        return self.last_generation * self.population * len(self.budgets)

    @property
    def pending(self) -> list[str]:
        return list(self._pending)

    def ask(self, n: int) -> list[tuple[str, str]]:
        """Up to ``n`` ``(arch, budget label)`` of the current generation; ``[]`` while the rest are being evaluated."""
        picked, self._queue = self._queue[:n], self._queue[n:]
        for c in picked:
            self._pending[c.arch] = c
        return [(c.arch, c.budget) for c in picked]

    def candidate(self, arch: str) -> Candidate:
        """The candidate record of an asked, queued or evaluated arch."""
        if arch in self._pending:
            return self._pending[arch]
        if arch in self.archive:
            rec = self.archive[arch]
            return Candidate(**{k: rec[k] for k in Candidate.__dataclass_fields__})
        for c in self._queue:
            if c.arch == arch:
                return c
        raise KeyError(arch)

    def tell(self, arch: str, loss: float) -> None:
        """Record an evaluated arch's validation loss (asked or still queued, once)."""
        name = self.space.format(arch)
        if name in self.archive:
            raise ValueError(f"{name}: already evaluated")
        c = self._pending.pop(name, None)
        if c is None:
            index = next((i for i, q in enumerate(self._queue) if q.arch == name), None)
            if index is None:
                raise ValueError(f"{name}: not a candidate of generation {self.generation}")
            c = self._queue.pop(index)
        self.archive[name] = {**asdict(c), "loss": float(loss)}
        self._advance()

    def fail(self, archs: Sequence[str]) -> None:
        """Evaluations failed: the archs go back to the front of the queue (in order) once, then are dropped."""
        again = []
        for arch in archs:
            name = self.space.format(arch)
            c = self._pending.pop(name)
            self._failures[name] += 1
            if self._failures[name] <= MAX_RETRIES:
                again.append(c)
            else:
                self.dropped.append(name)
                self.stats["failed"] += 1
        self._queue[:0] = again
        self._advance()

    def replay(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Tell stored rows (``arch``, ``generation``, ``proxy_loss``) to a fresh search; returns how many.

        The search regenerates each generation exactly as the original run did,
        so a row whose arch is not among its generation's candidates means the
        rows come from a different search: that is refused, not mixed in.
        """
        if self._pending or self.archive:
            raise ValueError("replay: only into a fresh search (nothing asked or told yet)")
        ordered = sorted(rows, key=lambda r: int(r["generation"]))
        for r in ordered:
            name, g = str(r["arch"]), int(r["generation"])
            if g != self.generation or all(c.arch != name for c in self._queue):
                where = (f"generation {self.generation} still misses {len(self._queue)} of its archs" if g > self.generation
                         else f"it is not among the archs this search makes in generation {g}")
                raise ConfigError(f"stored row {name} (generation {g}): {where}; the stored rows come from a "
                                  "different search (seed, budgets, strategy, population, constraint or predictor "
                                  "changed): use a new output folder")
            self.tell(name, float(r["proxy_loss"]))
        return len(ordered)

    # ---- serialisable state ----------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What decides the candidates; a restored state must have been made with the same (generations may grow)."""
        return {"space": self.space.name, "strategy": self.strategy, "population": self.population,
                "mutation_prob": self.mutation_prob, "exploration_prob": self.exploration_prob,
                "gene_prob": self.gene_prob, "seed": self.seed, "max_attempts": self.max_attempts,
                "budgets": [b.to_dict() for b in self.budgets]}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue, as JSON-compatible values (for ``Searcher.save``)."""
        return {"version": 1, "settings": self.settings(), "generations": self.generations,
                "generation": self.generation, "history": [list(g) for g in self.history],
                "archive": {k: dict(v) for k, v in self.archive.items()}, "dropped": list(self.dropped),
                "queue": [asdict(c) for c in self._queue], "pending": [asdict(c) for c in self._pending.values()],
                "stats": dict(self.stats), "failures": dict(self._failures), "exhausted": self._exhausted}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; asked-but-untold archs stay pending (their trials may still report)."""
        if state.get("settings") != self.settings():
            raise ConfigError("search state: made with other settings "
                              f"({state.get('settings')!r} vs {self.settings()!r})")
        self.generation = int(state["generation"])
        self.history = [list(g) for g in state["history"]]
        self.archive = {k: dict(v) for k, v in state["archive"].items()}
        self.dropped = list(state["dropped"])
        self._queue = [Candidate(**c) for c in state["queue"]]
        self._pending = {c["arch"]: Candidate(**c) for c in state["pending"]}
        self.stats, self._failures = Counter(state["stats"]), Counter(state["failures"])
        self._exhausted = bool(state["exhausted"])
        self._advance()

    # ---- making generations -------------------------------------------------------------------
    def _advance(self) -> None:
        """Make the next generation once every candidate of the current one is told (or dropped)."""
        while not self._queue and not self._pending and not self._exhausted and self.generation < self.last_generation:
            self.generation += 1
            made = self._make(self.generation)
            self.history.append([c.arch for c in made])
            self._queue = made
            if not made:
                self._exhausted = True

    def _make(self, t: int) -> list[Candidate]:
        rng = random.Random(f"{self.seed}/{t}")  # str seeds hash deterministically: same generation on every rerun
        taken = set(self.archive) | set(self.dropped)
        out: list[Candidate] = []
        for budget in self.budgets:
            if self.strategy == "fast":
                out += self._fast(budget, t, taken)
            elif self.strategy == "random" or t == 1:
                out += self._sample(budget, t, rng, taken)
            else:
                out += self._evolve(budget, t, rng, taken)
        return out

    def _accept(self, arch: Any, budget: Budget, t: int, origin: str, taken: set[str], out: list[Candidate]) -> bool:
        name = self.space.format(arch)
        if name in taken:
            self.stats["rejected_duplicate"] += 1
            return False
        cost = self._costs([name])[0]
        if cost > budget.value:
            self.stats["rejected_budget"] += 1
            return False
        taken.add(name)
        out.append(Candidate(name, budget.label, t, origin, cost))
        self.stats[f"accepted_{origin}"] += 1
        return True

    def _sample(self, budget: Budget, t: int, rng: random.Random, taken: set[str]) -> list[Candidate]:
        """Uniform samples of the space that fit ``budget`` (generation 1, and every generation of random search)."""
        origin = "random" if self.strategy == "random" else "initial"
        new: list[Candidate] = []
        for _ in range(self.max_attempts * self.population):
            if len(new) >= self.population:
                break
            self.stats["samples"] += 1
            self._accept(self.space.sample(rng), budget, t, origin, taken, new)
        if self.strategy == "evolution":
            self._fallback(budget, t, rng, taken, new)
        return new

    def _evolve(self, budget: Budget, t: int, rng: random.Random, taken: set[str]) -> list[Candidate]:
        """Algorithm 2's inner loop for one budget: roulette parent, mutate w.p. p_m, explore w.p. p_e."""
        fits = [a for a in self.history[t - 2] if a in self.archive and self.archive[a]["cost"] <= budget.value]
        if not fits:  # nothing of the last generation fits: parents from every earlier generation
            fits = [a for gen in self.history[: t - 1] for a in gen
                    if a in self.archive and self.archive[a]["cost"] <= budget.value]
        weights = roulette_weights([self.archive[a]["loss"] for a in fits])
        new: list[Candidate] = []
        for _ in range(self.max_attempts * self.population):
            if len(new) >= self.population:
                break
            self.stats["draws"] += 1
            parent = fits[roulette(weights, rng)] if fits else None
            proposals = []
            if parent is not None and rng.random() < self.mutation_prob:
                self.stats["mutations"] += 1
                proposals.append(("mutation", self.space.mutate(self.space.parse(parent), rng, self.gene_prob)))
            if parent is None or rng.random() < self.exploration_prob:
                self.stats["explorations"] += 1
                proposals.append(("exploration", self.space.sample(rng)))
            for origin, arch in proposals:
                if len(new) < self.population:
                    self._accept(arch, budget, t, origin, taken, new)
        self._fallback(budget, t, rng, taken, new)
        return new

    def _fallback(self, budget: Budget, t: int, rng: random.Random, taken: set[str], new: list[Candidate]) -> None:
        """Fill a short population by mutating feasible archs (the smallest arch first) -- tight budgets."""
        if len(new) >= self.population:
            return
        smallest = self.space.format(self.space.smallest())
        self._accept(smallest, budget, t, "fallback", taken, new)
        seeds = [smallest] + [a for a, r in self.archive.items() if r["cost"] <= budget.value]
        for _ in range(self.max_attempts * self.population):
            if len(new) >= self.population:
                break
            pool = seeds + [c.arch for c in new]
            parent = self.space.parse(pool[rng.randrange(len(pool))])
            self._accept(self.space.mutate(parent, rng, self.gene_prob), budget, t, "fallback", taken, new)
        self.stats["short"] += self.population - len(new)

    def _fast(self, budget: Budget, t: int, taken: set[str]) -> list[Candidate]:
        """AutoTinyBERT-Fast: per layer count, the widest d_m with a rule-abiding (d_f, h, d_qkv) that fits."""
        new: list[Candidate] = []
        for layers in self.space.dims["layers"].values:  # type: ignore[attr-defined]
            arch = fast_arch(self.space, layers, budget.value, self._costs)  # type: ignore[arg-type]
            if arch is None:
                self.stats["fast_no_fit"] += 1
            elif self.space.format(arch) in taken:
                self.stats["fast_shared"] += 1  # another budget's candidate: its evaluation serves this one too
            else:
                self._accept(arch, budget, t, "fast", taken, new)
        return new


def _rule_dims(space: HomogeneousSpace, hidden: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The d_f values and (h, d_qkv) pairs of ``space`` inside the AutoTinyBERT-Fast rule for ``hidden``."""
    values = space.dims["ffn"].values
    lo, hi = bisect.bisect_left(values, FAST_DF[0] * hidden), bisect.bisect_right(values, FAST_DF[1] * hidden)
    heads = [(h, q) for h in space.dims["heads"].values for q in space._qkv_choices(h)
             if FAST_DQKV[0] * hidden <= q <= FAST_DQKV[1] * hidden]
    return list(values[lo:hi]), heads


def fast_rule_archs(space: HomogeneousSpace, layers: int, hidden: int) -> list[TinyArch]:
    """Every arch of ``space`` with ``layers`` and ``hidden`` inside the AutoTinyBERT-Fast rule."""
    ffns, heads = _rule_dims(space, hidden)
    return [TinyArch(layers, hidden, f, h, q) for f in ffns for h, q in heads]


def fast_arch(space: HomogeneousSpace, layers: int, limit: float, costs: Costs) -> TinyArch | None:
    """The rule-abiding arch with ``layers`` of the widest d_m that fits ``limit``, using as much of it as fits.

    The widest d_m is found by the cheapest rule-abiding arch of each width
    (smallest d_f, then smallest d_qkv); among that width's archs the one of
    largest cost within ``limit`` is taken. None when no width fits.
    """
    cheapest = []
    for d in sorted(space.dims["hidden"].values, reverse=True):
        ffns, heads = _rule_dims(space, d)
        if ffns and heads:
            h, q = min(heads, key=lambda hq: (hq[1], hq[0]))
            cheapest.append(TinyArch(layers, d, ffns[0], h, q))
    for low, cost in zip(cheapest, costs([str(a) for a in cheapest]), strict=True):
        if cost <= limit:
            archs = fast_rule_archs(space, layers, low.hidden)
            fitting = [(c, a) for a, c in zip(archs, costs([str(a) for a in archs]), strict=True) if c <= limit]
            return max(fitting, key=lambda ca: ca[0])[1]
    return None
