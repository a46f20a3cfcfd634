"""Model files: weights in safetensors beside a JSON model card, and training checkpoints.

A model is `<name>.safetensors` (tensors only, never a pickle) plus `<name>.json` (the card:
architecture, input grid, intensity and field normalisation, training data, split,
command, metrics). Shipped models live in `Resources/Models/` at the repository root;
`PRIORREG_MODELS` (a folder) is searched first, so users and Slicer can add their own.

Checkpoints are safetensors too: network weights and optimizer state flattened to
tensors, the rest (iteration, optimizer hyper-parameters) as JSON in the file's metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import atomic_write

# torch (and safetensors' torch API) are imported inside the functions that need them: the Slicer
# panels list models and their cards before torch is installed.

SHIPPED = Path(__file__).resolve().parent.parent / "Resources" / "Models"
# Model-card methods whose networks can be fine-tuned on the pair at hand (the CLI's --finetune-steps, the
# registration panel's fine-tuning): here, torch-free, so that the panels can read it before torch is installed.
FINETUNED = ("adversarial", "symmetric", "deformgan")


def model_dirs() -> list[Path]:
    """Where model names are looked up, in order."""
    extra = os.environ.get("PRIORREG_MODELS")
    return ([Path(extra)] if extra else []) + [SHIPPED]


def available_models() -> dict[str, dict]:
    """Every model found by name: `{name: card}` (the first folder wins)."""
    found: dict[str, dict] = {}
    for folder in model_dirs():
        for card in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if card.with_suffix(".safetensors").exists():
                found.setdefault(card.stem, json.loads(card.read_text()))
    return found


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The `.safetensors` file of a model name or path; a clear error naming what exists."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"model file not found: {path}")
        return path
    for folder in model_dirs():
        candidate = folder / f"{name_or_path}.safetensors"
        if candidate.exists():
            return candidate
    names = ", ".join(sorted(available_models())) or "none"
    raise FileNotFoundError(f"no model named {name_or_path!r} (available: {names}; or give a .safetensors path)")


def save_model(path: str | os.PathLike, tensors: dict, card: dict) -> Path:
    """Write `<path>.safetensors` and its card `<path>.json`, each atomically."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"))
    return path


def load_model(name_or_path: str | os.PathLike, method: str | None = None) -> tuple[dict, dict, Path]:
    """Tensors, card and file of a model; the card must sit beside the weights.

    With `method`, a `ValueError` unless the card says the model is one (a network of one method
    handed to another would load nothing, or load wrong).
    """
    from safetensors.torch import load_file

    path = resolve_model(name_or_path)
    card_path = path.with_suffix(".json")
    if not card_path.exists():
        raise FileNotFoundError(f"{path}: its model card {card_path.name} is missing")
    card = json.loads(card_path.read_text())
    if method is not None and card.get("method") != method:
        raise ValueError(f"{path}: a {card.get('method')!r} model, not a {method!r} one")
    return load_file(path), card, path


def prefixed(tensors: dict, prefix: str) -> dict:
    """The entries under `prefix.`, with the prefix removed (one network of a multi-network file)."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def restore(net, tensors: dict, prefix: str, device):
    """`net` holding the weights under `prefix.` of a model file, on `device`, in inference mode."""
    net.load_state_dict(prefixed(tensors, prefix))
    return net.to(device).eval()


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | os.PathLike, modules: dict, optimizers: dict, meta: dict) -> None:
    """Weights of `modules` and state of `optimizers` (name -> object) with `meta`, atomically."""
    import torch
    from safetensors.torch import save_file

    tensors: dict = {}
    groups = {}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for name, opt in optimizers.items():
        state = opt.state_dict()
        groups[name] = state["param_groups"]
        for index, values in state["state"].items():
            for key, value in values.items():
                tensors[f"optim.{name}.{index}.{key}"] = torch.as_tensor(value)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"meta": json.dumps(meta), "param_groups": json.dumps(groups)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | os.PathLike, modules: dict, optimizers: dict) -> dict:
    """Restore what `save_checkpoint` wrote into `modules` and `optimizers`; returns its `meta`."""
    from safetensors.torch import load_file, safe_open

    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    for name, module in modules.items():
        module.load_state_dict(prefixed(tensors, name))
    groups = json.loads(metadata["param_groups"])
    for name, opt in optimizers.items():
        state: dict[int, dict] = {}
        for key, value in prefixed(tensors, f"optim.{name}").items():
            index, field = key.split(".", 1)
            state.setdefault(int(index), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": groups[name]})
    return json.loads(metadata["meta"])
