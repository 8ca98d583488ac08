"""Resumable multi-stage runs: each stage is skipped when its output exists, refused when its config changed.

A pipeline such as ``raynas autotinybert`` chains long stages (supernet
training, latency measurement, search, further training) in one run folder.
A rerun after a crash or a kill must pick up where it stopped, and a user who
edits the config between runs must not get results silently mixed from two
configs. So every stage records, in ``RUN/stages.json``, the config it started
with (and the names of the stages it read from); on a rerun:

- a finished stage with the same config is skipped (its outputs are reused);
- a started, unfinished stage with the same config is run again, and resumes
  from whatever the stage itself checkpointed (training checkpoints, stored
  search rows, measured latency rows);
- a stage whose config differs from the recorded one is refused with one
  message naming the changed fields, before anything runs, so nothing is lost.

One process writes a run folder at a time: the first :meth:`StageRun.run` takes
``RUN/.raynas.lock`` (:mod:`raynas.run_lock`) and holds it while the StageRun
lives, so a second run on the folder is refused naming the first's pid and host;
:meth:`~StageRun.check` and :meth:`~StageRun.status` (dry runs) refuse the same
way but take nothing.

Pure python: no Ray, no torch.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from raynas.atomic_io import atomic_file
from raynas.errors import ConfigError
from raynas.run_lock import RunLock, check_run_lock

T = TypeVar("T")
STAGES_FILE = "stages.json"


def clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour): elapsed times and ETAs in every progress line."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, so a diff can name the exact field."""
    if isinstance(raw, Mapping) and raw:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): raw}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["field: old -> new", ...]`` for every leaf that differs (added and removed fields included)."""
    a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(unset)") != b.get(k, "(unset)")]


@dataclass
class StageRun:
    """The stages of one run folder and their recorded configs; see the module docstring."""

    root: Path
    names: list[str]
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.started_at = time.perf_counter()
        self.records: dict[str, dict[str, Any]] = self._load()
        self.lock = RunLock(self.root, say=self.log)  # taken by the first run(), not here: dry runs build one too

    def _load(self) -> dict[str, dict[str, Any]]:
        path = self.root / STAGES_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable stage record ({exc}); move it away to start the run afresh") from None

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.root / STAGES_FILE) as tmp:
            Path(tmp).write_text(json.dumps(self.records, indent=2, sort_keys=True) + "\n")

    def check(self, configs: Mapping[str, Mapping[str, Any]]) -> None:
        """Refuse, before any stage runs, a folder another run holds and every recorded stage whose config
        differs from ``configs[name]``."""
        check_run_lock(self.root)
        problems = []
        for name, cfg in configs.items():
            record = self.records.get(name)
            if record is not None:
                changed = config_diff(record["config"], cfg)
                if changed:
                    state = "finished" if record.get("done") else "started"
                    problems.append(f"stage {name!r} {state} in {self.root} with a different config "
                                    f"({'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''})")
        if problems:
            raise ConfigError("; ".join(problems) + ". Use a new 'out' folder, or delete the stage's output and its "
                                                    f"entry in {self.root / STAGES_FILE} to redo it")

    def status(self) -> str:
        """``supernet done, latency to run, ...``: what a rerun of this folder would skip and run (dry runs);
        a folder another run holds is refused as the run would be."""
        check_run_lock(self.root)
        return ", ".join(f"{n} {'done' if self.done(n) else 'started' if n in self.records else 'to run'}"
                         for n in self.names)

    def done(self, name: str) -> bool:
        return bool(self.records.get(name, {}).get("done"))

    def run(self, name: str, config: Mapping[str, Any], fn: Callable[[], T],
            summary: Callable[[T], Any] = lambda result: result) -> Any:
        """Run stage ``name`` and return ``summary(fn())``, or skip it and return the summary recorded when it ran.

        The summary is JSON-able data kept in the record: what later stages read, so
        a fresh run and a resumed one hand them exactly the same thing.
        """
        i = self.names.index(name) + 1
        if not self.lock.held:  # this process's first write into the folder
            self.lock.acquire()
            self.records = self._load()  # as the last holder left it (it may have finished since we read it)
        head = f"[stage {i}/{len(self.names)}] {name}"
        self.check({name: config})
        if self.done(name):
            self.log(f"{head}: done in an earlier run, skipped")
            return self.records[name].get("summary")
        resumed = name in self.records
        self.records[name] = {"config": json.loads(json.dumps(config)), "done": False,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._save()
        self.log(f"{head}: {'resuming' if resumed else 'starting'} "
                 f"(run elapsed {time.perf_counter() - self.started_at:.0f} s)")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        record = self.records[name]
        record.update(done=True, seconds=round(seconds, 1), summary=json.loads(json.dumps(summary(result))))
        self._save()
        self.log(f"{head}: finished in {seconds:.0f} s")
        return record["summary"]
