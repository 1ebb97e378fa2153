"""What ``ater-eval`` evaluates: an ater-train checkpoint, or any model a
user's factory builds (``--model-factory package.module:function`` with a
``--weights`` state dict read with ``weights_only=True``), with the test split
of a dataset. Either way the model is checked to map the data to
``[B, classes]`` logits before any attack runs."""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from .. import robustness
from ..data import DATASETS, Dataset, load_dataset
from ..models import build_model
from .common import CliError, first_line, load_checkpoint


@dataclass
class Target:
    """A model to evaluate, its data, and what the reports say about it."""

    label: str
    model: nn.Module
    data: Dataset
    info: Dict[str, object] = field(default_factory=dict)  # method, dataset, model, epoch, selection, ...


def _selection_note(cfg: dict) -> str:
    """How the checkpoint was selected (old checkpoints predate the validation split)."""
    if "val_size" not in cfg:
        return "test set (a checkpoint from before the validation split: its figures are optimistic)"
    if not cfg["val_size"]:
        return "last epoch (no validation set)"
    return f"validation ({cfg['val_size']} images, --select {cfg.get('select', 'clean')})"


def from_checkpoint(path: str, data_dir: Optional[str], device: torch.device) -> Target:
    state = load_checkpoint(path)
    cfg = state["config"]
    for key in ("dataset", "model", "method"):
        if not isinstance(cfg.get(key), str):
            raise CliError(f"{path} is not a valid ater-train checkpoint (config has no {key})")
    data = load_dataset(cfg["dataset"], data_dir if data_dir is not None else cfg.get("data_dir"))
    model = build_model(cfg["model"], data.input_shape, data.num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CliError(f"{path}: the weights do not fit a {cfg['model']} for {cfg['dataset']} "
                       f"({first_line(exc)})") from None
    info = {"checkpoint": path, "method": cfg["method"], "dataset": cfg["dataset"], "model": cfg["model"],
            "epoch": int(state["epoch"]), "seed": cfg.get("seed"), "selected_on": _selection_note(cfg),
            "train_eps_adv": cfg.get("eps_adv"), "train_norm": cfg.get("norm", "l2"), "train_eps": cfg.get("eps")}
    return Target(label=path, model=model.to(device).eval(), data=data, info=info)


def _import_factory(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--model-factory must be package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise CliError(f"--model-factory {spec}: cannot import {module_name} ({first_line(exc)})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise CliError(f"--model-factory {spec}: {module_name} has no attribute {attr}")
    if not callable(fn):
        raise CliError(f"--model-factory {spec}: {attr} is not callable")
    return fn


def parse_output(text: Optional[str]):
    """``--output``: an index when it is an integer, else a key (None: the model returns logits)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def from_factory(spec: str, weights: Optional[str], kwargs_json: Optional[str], dataset: Optional[str],
                 data_dir: Optional[str], label: Optional[str], device: torch.device,
                 output: Optional[str] = None) -> Target:
    if dataset is None:
        raise CliError(f"--model-factory needs --dataset (one of {', '.join(DATASETS)}) for its test data")
    if dataset not in DATASETS:
        raise CliError(f"--dataset {dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as exc:
        raise CliError(f"--factory-kwargs is not JSON ({first_line(exc)})") from None
    if not isinstance(kwargs, dict):
        raise CliError(f"--factory-kwargs must be a JSON object, got {kwargs_json!r}")
    fn = _import_factory(spec)
    try:
        model = fn(**kwargs)
    except Exception as exc:
        raise CliError(f"--model-factory {spec} raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"--model-factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        if not os.path.isfile(weights):
            raise CliError(f"--weights {weights} not found")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CliError(f"cannot read --weights {weights}: {first_line(exc)}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # an ater-train checkpoint's weights
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise CliError(f"--weights {weights} do not fit the factory's model ({first_line(exc)})") from None
    data = load_dataset(dataset, data_dir)
    name = label or spec
    info = {"checkpoint": weights or "(factory weights)", "factory": spec, "method": name, "dataset": dataset,
            "model": type(model).__name__, "epoch": None, "seed": None, "output": output,
            "selected_on": "unknown (user model)"}
    model = robustness.logits_model(model, parse_output(output), "ater-eval --output")
    return Target(label=name, model=model.to(device).eval(), data=data, info=info)


def check_target(target: Target, device: torch.device) -> None:
    """The model maps this data to [B, classes] logits (one-line error otherwise)."""
    x = target.data.x_test[:2].to(device)
    try:
        robustness.check_logits("ater-eval", target.model, x, target.data.num_classes)
    except (ValueError, TypeError) as exc:
        raise CliError(f"{target.label}: {str(exc).split(': ', 1)[-1]}") from None
    except Exception as exc:
        raise CliError(f"{target.label}: the model fails on {target.data.name} inputs "
                       f"{list(x.shape)} ({type(exc).__name__}: {first_line(exc)})") from None
