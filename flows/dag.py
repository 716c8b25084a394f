"""The pipeline's stages as dvc.yaml declares them: order, upstream stages and placement.

Pure functions over the parsed dvc.yaml, so the flows never keep a second copy of the DAG.
"""

from __future__ import annotations

import ast
import contextlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imtok import layout


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # cached outputs (pushed to and pulled from a DVC remote)
    params: tuple[str, ...]
    uncached: tuple[str, ...] = ()  # outs, metrics and plots with cache: false: git keeps them, no remote
    metrics: tuple[str, ...] = ()  # its metrics files, cached or not

    @property
    def pool(self) -> str:
        """``gpu`` for the stages that run a model (they list a ``run.<section>.device``), else ``cpu``."""
        return "gpu" if any(key.rpartition(".")[2] == "device" for key in self.params) else "cpu"


def _paths(entries: list[Any] | None, cached: bool | None = None) -> tuple[str, ...]:
    """The paths of dvc.yaml entries (``path`` or ``{path: options}``): all of them, or only the
    cached (``cached=True``) or only the uncached (``cached=False``) ones."""
    paths = []
    for entry in entries or []:
        path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if cached is None or (options or {}).get("cache", True) is cached:
            paths.append(path)
    return tuple(paths)


def _param_keys(entries: list[Any] | None) -> tuple[str, ...]:
    keys = []
    for entry in entries or []:
        if isinstance(entry, dict):  # {params-file: [keys]}
            for values in entry.values():
                keys.extend(values or [])
        else:
            keys.append(entry)
    return tuple(keys)


def variables(project: Path, entries: list[Any] | None) -> dict[str, Any]:
    """The variables a dvc.yaml declares under ``vars``, as DVC reads them: inline mappings, a Python
    file's top-level literal assignments (``imtok/layout.py``), a YAML file's mapping."""
    found: dict[str, Any] = {}
    for entry in entries or []:
        if isinstance(entry, dict):
            found.update(entry)
            continue
        path = Path(project) / str(entry)
        if not path.is_file():
            raise FileNotFoundError(f"{Path(project) / 'dvc.yaml'}: vars names {entry}, which is not a file")
        if path.suffix != ".py":
            found.update(yaml.safe_load(path.read_text()) or {})
            continue
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                with contextlib.suppress(ValueError):
                    found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def _resolved(entries: list[Any] | None, values: dict[str, Any], where: str) -> list[Any]:
    """dvc.yaml entries (``path`` or ``{path: options}``) with ``${NAME}`` replaced as DVC does."""

    def resolve(text: str) -> str:
        try:
            return string.Template(text).substitute(values)
        except (KeyError, ValueError) as error:
            raise ValueError(f"{where}: {text!r} names no variable of dvc.yaml's vars ({error})") from None

    return [
        {resolve(key): options for key, options in entry.items()}
        if isinstance(entry, dict)
        else resolve(entry)
        for entry in entries or []
    ]


def read_stages(project: Path) -> list[Stage]:
    """The stages of ``project/dvc.yaml`` in file order, which must be a topological order; paths
    with ``${NAME}`` are resolved from its ``vars``."""
    path = Path(project) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml; run the flow from the project's root")
    document = yaml.safe_load(path.read_text()) or {}
    values = variables(Path(project), document.get("vars"))
    stages = []
    for name, body in (document.get("stages") or {}).items():
        entries = {
            kind: _resolved(body.get(kind), values, f"{path}: stage {name}")
            for kind in ("deps", "outs", "metrics", "plots")
        }
        uncached = sum((_paths(entries[kind], cached=False) for kind in ("outs", "metrics", "plots")), ())
        stages.append(
            Stage(
                name,
                _paths(entries["deps"]),
                _paths(entries["outs"], cached=True),
                _param_keys(body.get("params")),
                uncached=uncached,
                metrics=_paths(entries["metrics"]),
            )
        )
    check_order(stages)
    return stages


def uncached_outputs(stages: list[Stage]) -> list[str]:
    """Every stage's ``cache: false`` outputs: an experiment has to include them itself, a sweep put
    them back itself, and no remote holds them."""
    return list(dict.fromkeys(path for stage in stages for path in stage.uncached))


def metric_writers(stages: list[Stage]) -> set[str]:
    """The stages that write ``metrics/*.json`` (what the pipeline flow reports)."""
    return {
        stage.name for stage in stages if any(path.startswith(f"{layout.METRICS}/") for path in stage.metrics)
    }


def _covers(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")


def upstream(stages: list[Stage], name: str) -> list[str]:
    """The stages whose outputs ``name`` depends on directly, in pipeline order."""
    stage = next((s for s in stages if s.name == name), None)
    if stage is None:
        raise KeyError(f"stage {name!r} is not in dvc.yaml (stages: {[s.name for s in stages]})")
    found = {
        other.name
        for other in stages
        if other.name != name
        for out in (*other.outs, *other.uncached)  # reports/params.json of check_params is uncached
        for dep in stage.deps
        if _covers(out, dep)
    }
    return [s.name for s in stages if s.name in found]


def check_order(stages: list[Stage]) -> None:
    """Each stage's inputs must come from stages declared before it."""
    seen: set[str] = set()
    for stage in stages:
        late = [name for name in upstream(stages, stage.name) if name not in seen]
        if late:
            raise ValueError(
                f"dvc.yaml: stage {stage.name!r} depends on {late}, declared after it; "
                "declare stages in pipeline order"
            )
        seen.add(stage.name)


def select(stages: list[Stage], names: list[str] | None) -> list[Stage]:
    """The named stages in pipeline order (all when ``names`` is empty); unknown names fail."""
    if not names:
        return list(stages)
    known = {stage.name for stage in stages}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise KeyError(f"unknown stage(s) {unknown}; dvc.yaml has {sorted(known)}")
    return [stage for stage in stages if stage.name in names]
