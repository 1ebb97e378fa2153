"""Recipe files: the settings of one row of the paper's tables (SPEC section 4)
as TOML, read by ``ater-train --config FILE|NAME`` and ``ater-sweep``.

A recipe has four tables::

    [recipe]            name, row (the SPEC section 4 row), methods (the row's methods), description
    [train]             ater-train options, named as the flags with "_" for "-" (lr = 0.001)
    [method.<name>]     options for one method only (they win over [train])
    [eval]              ater-sweep's robust accuracy: attack, eps, steps, limit, eps_list

Values become ater-train's defaults; a flag given on the command line wins.
Every key is checked against ater-train's own option (type, choices, range)
when the file is read: an unknown key, a wrong type or a value out of range is
a one-line error naming the file and the key. A ``[run]`` table (what
``ater-train`` writes into ``OUT/config.toml`` about the machine and folder)
is informational and ignored, so a run's ``config.toml`` is itself a recipe
that repeats the run.

The shipped recipes live in ``ater_ext/recipes/*.toml``; each value there cites
its source in a comment, and values that could not be confirmed say so.
"""
from __future__ import annotations

import argparse
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .. import robustness
from .common import CliError

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

# ater-train options that describe a machine or an invocation, not an experiment
NOT_IN_RECIPES = frozenset({"help", "config", "out", "resume", "overwrite", "stop_after", "device", "data_dir",
                            "quiet", "tensorboard", "no_verify_checksums"})
# lower bounds of the integer options (argparse's plain int type checks none)
INT_MIN = {"epochs": 1, "batch_size": 1, "ul_batch_size": 1, "labels": 1, "val_size": 0, "steps": 1,
           "decay_start": 0, "updates_per_epoch": 1, "select_subset": 1}
RECIPE_KEYS = frozenset({"name", "row", "methods", "description"})
EVAL_KEYS = {"attack": str, "eps": float, "steps": int, "limit": int, "eps_list": list}
TABLES = ("recipe", "train", "method", "eval", "run")


@dataclass
class Recipe:
    """A parsed, checked recipe file."""

    name: str
    path: str
    row: str
    methods: List[str]
    train: Dict[str, Any]
    per_method: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    eval: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def defaults(self, method: str) -> Dict[str, Any]:
        """ater-train defaults for ``method``: [train], then [method.<method>]."""
        return {**self.train, **self.per_method.get(method, {})}


def recipe_names() -> List[str]:
    """Names of the shipped recipes (``ater_ext/recipes/<name>.toml``)."""
    if not os.path.isdir(RECIPE_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".toml"))


def recipe_path(spec: str) -> str:
    """A recipe file: ``spec`` itself when it is a file, else the shipped recipe of that name."""
    if os.path.isfile(spec):
        return spec
    if os.sep not in spec and not spec.endswith(".toml") and spec in recipe_names():
        return os.path.join(RECIPE_DIR, spec + ".toml")
    raise CliError(f"--config {spec}: no such file, and not a shipped recipe (known: {', '.join(recipe_names())})")


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_option(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` for ater-train's option ``action``, checked as the command line
    would check it (type, choices, range); a one-line :class:`CliError` naming
    ``path`` and ``key`` otherwise."""
    def bad(why: str) -> CliError:
        return CliError(f"recipe {path}: {key} = {value!r}: {why}")

    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise bad(f"must be true or false, got a {_type_name(value)}")
        return value
    kind = action.type
    if kind is not None and getattr(kind, "accepts_list", False):
        if not isinstance(value, (str, list)):
            raise bad(f"must be a string or a list of strings, got a {_type_name(value)}")
        try:
            return kind(value)
        except ValueError as exc:
            raise bad(str(exc)) from None
    if action.choices is not None:
        if not isinstance(value, str):
            raise bad(f"must be a string, got a {_type_name(value)}")
        if value not in action.choices:
            raise bad(f"must be one of {', '.join(map(str, action.choices))}")
        return value
    if kind is int or getattr(kind, "__name__", "") == "positive_int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be an integer, got a {_type_name(value)}")
        low = INT_MIN.get(action.dest, 1 if kind is not int else None)
        if low is not None and value < low:
            raise bad(f"must be >= {low}")
        return value
    if getattr(kind, "__name__", "") == "nonnegative_float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, got a {_type_name(value)}")
        if not (math.isfinite(value) and value >= 0):
            raise bad("must be finite and >= 0")
        return float(value)
    if kind is float or getattr(kind, "__name__", "") == "positive_float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, got a {_type_name(value)}")
        if not (math.isfinite(value) and value > 0):
            raise bad("must be finite and > 0")
        return float(value)
    if not isinstance(value, str):
        raise bad(f"must be a string, got a {_type_name(value)}")
    return value


def _check_table(path: str, where: str, table: Any, actions: Dict[str, argparse.Action]) -> Dict[str, Any]:
    if not isinstance(table, dict):
        raise CliError(f"recipe {path}: [{where}] must be a table, got a {_type_name(table)}")
    out = {}
    for key, value in table.items():
        name = f"{where}.{key}"
        if key not in actions or key in NOT_IN_RECIPES:
            hint = (" (a machine or invocation setting: give it on the command line)" if key in NOT_IN_RECIPES
                    else f" (known: {', '.join(sorted(k for k in actions if k not in NOT_IN_RECIPES))})")
            raise CliError(f"recipe {path}: unknown key {name}{hint}")
        out[key] = check_option(path, name, value, actions[key])
    return out


def _check_eval(path: str, table: Any) -> Dict[str, Any]:
    if not isinstance(table, dict):
        raise CliError(f"recipe {path}: [eval] must be a table, got a {_type_name(table)}")
    out: Dict[str, Any] = {}
    for key, value in table.items():
        name = f"eval.{key}"
        if key not in EVAL_KEYS:
            raise CliError(f"recipe {path}: unknown key {name} (known: {', '.join(EVAL_KEYS)})")
        want = EVAL_KEYS[key]
        ok = (isinstance(value, want) and not isinstance(value, bool)) or (
            want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise CliError(f"recipe {path}: {name} = {value!r}: must be a {want.__name__}, got a {_type_name(value)}")
        if key == "attack" and value not in robustness.ATTACKS:
            raise CliError(f"recipe {path}: {name} = {value!r}: must be one of {', '.join(robustness.ATTACKS)}")
        if key == "eps" and not (math.isfinite(value) and value > 0):
            raise CliError(f"recipe {path}: {name} = {value!r}: must be finite and > 0")
        if key in ("steps", "limit") and value < 1:
            raise CliError(f"recipe {path}: {name} = {value!r}: must be >= 1")
        if key == "eps_list" and not (value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    and math.isfinite(v) and v >= 0 for v in value)):
            raise CliError(f"recipe {path}: {name} = {value!r}: must be a non-empty list of numbers >= 0")
        out[key] = [float(v) for v in value] if key == "eps_list" else (float(value) if want is float else value)
    return out


def load_recipe(spec: str, parser: argparse.ArgumentParser, methods: List[str]) -> Recipe:
    """Read and check the recipe ``spec`` (a file or a shipped name) against
    ater-train's ``parser``; ``methods`` are the known methods."""
    path = recipe_path(spec)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"recipe {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise CliError(f"recipe {path}: cannot read it ({exc.strerror})") from None
    unknown = [k for k in doc if k not in TABLES]
    if unknown:
        raise CliError(f"recipe {path}: unknown key {unknown[0]} (tables: {', '.join(TABLES)})")
    actions = {a.dest: a for a in parser._actions}
    head = doc.get("recipe", {})
    if not isinstance(head, dict):
        raise CliError(f"recipe {path}: [recipe] must be a table")
    for key in head:
        if key not in RECIPE_KEYS:
            raise CliError(f"recipe {path}: unknown key recipe.{key} (known: {', '.join(sorted(RECIPE_KEYS))})")
    name = head.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or not name or "/" in name:
        raise CliError(f"recipe {path}: recipe.name = {name!r}: must be a non-empty string without '/'")
    row_methods = head.get("methods", [])
    if not isinstance(row_methods, list) or not all(isinstance(m, str) for m in row_methods):
        raise CliError(f"recipe {path}: recipe.methods = {row_methods!r}: must be a list of method names")
    for m in row_methods:
        if m not in methods:
            raise CliError(f"recipe {path}: recipe.methods: unknown method {m!r} (known: {', '.join(methods)})")
    for key in ("row", "description"):
        if not isinstance(head.get(key, ""), str):
            raise CliError(f"recipe {path}: recipe.{key} must be a string")
    train = _check_table(path, "train", doc.get("train", {}), actions)
    per_method = {}
    method_tables = doc.get("method", {})
    if not isinstance(method_tables, dict):
        raise CliError(f"recipe {path}: [method] must hold tables [method.<name>]")
    for m, table in method_tables.items():
        if m not in methods:
            raise CliError(f"recipe {path}: unknown key method.{m} (methods: {', '.join(methods)})")
        per_method[m] = _check_table(path, f"method.{m}", table, actions)
    return Recipe(name=name, path=path, row=head.get("row", ""), methods=row_methods or list(methods[:1]),
                  train=train, per_method=per_method, eval=_check_eval(path, doc.get("eval", {})),
                  description=head.get("description", ""))


def find_recipe(name: str) -> Optional[str]:
    """The shipped recipe file of ``name``, or None."""
    return os.path.join(RECIPE_DIR, name + ".toml") if name in recipe_names() else None
