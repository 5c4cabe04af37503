"""Hugging Face hub directories: ``config.json`` + safetensors weights, read and written without
torch, transformers or the safetensors package.

A directory holds ``config.json`` and either ``model.safetensors`` or the shards
``model-00001-of-0000n.safetensors`` … with ``model.safetensors.index.json`` (``{"metadata":
{"total_parameters", "total_size"}, "weight_map": {key: shard file}}``), exactly as
``transformers``' ``save_pretrained(..., safe_serialization=True)`` writes them (each file's
header metadata ``{"format": "pt"}``). :func:`from_pretrained` builds the model from
``config["model_type"]`` through a registry of model modules (:data:`REGISTRY`,
:func:`register`), each providing ``from_hf_config(config) -> Layer``, ``hf_config(model) ->
dict`` (``model_type`` included), ``hf_input_shape(config) -> tuple`` and ``HF_PREFIX`` (the
base model's name inside a model with a head: ``"transformer"`` in GPT-2's
``transformer.h.0...``; ``""`` for none), and loads the weights with
:func:`fnn.torch_weights.load_state_dict`. :func:`save_pretrained` writes them back with
:func:`fnn.torch_weights.state_dict`, tied aliases left out (as transformers does), into a
temporary directory renamed into place: a failure leaves the old directory as it was, and files
there other than the config and weights (a tokenizer, ``generation_config.json``) are kept.

A checkpoint of the base model read into a model with a head (or the reverse) is matched by
``HF_PREFIX``: keys without the prefix get it; with a head's checkpoint read into a base model,
the prefix is taken off and the head's keys are left out (with a warning), as transformers does.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import struct
import tempfile
import warnings

import numpy as np

from fnn.checkpoint import _format
from fnn.torch_weights import _run, _sinks, read_state_dict

__all__ = ["from_pretrained", "save_pretrained", "register", "REGISTRY", "read_weights",
           "write_weights"]

REGISTRY = {"gpt2": "fnn.models.gpt2", "llama": "fnn.models.llama", "bert": "fnn.models.bert"}
SINGLE, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def register(model_type: str, module: str) -> None:
    """Make ``from_pretrained`` build ``model_type`` with the module named ``module`` (a dotted
    import path; imported when first used) and ``save_pretrained`` write models it builds."""
    if not isinstance(model_type, str) or not isinstance(module, str):
        raise TypeError(f"register: model_type and module are strings, got {model_type!r}, "
                        f"{module!r}")
    REGISTRY[model_type] = module


def _module(path, why):
    try:
        mod = importlib.import_module(path)
    except ImportError as e:
        raise ValueError(f"{why}: its module {path} cannot be imported ({e})") from None
    missing = [f for f in ("from_hf_config", "hf_config", "hf_input_shape", "HF_PREFIX")
               if not hasattr(mod, f)]
    if missing:
        raise ValueError(f"{why}: module {path} lacks {', '.join(missing)} (a hub module "
                         f"provides from_hf_config, hf_config, hf_input_shape and HF_PREFIX)")
    return mod


# --------------------------------------------------------------------------- reading

def _read_file(path):
    header, _, data, _ = _format.read(path)
    return {k: _format.array(e, data) for k, e in header.items()}


def _read_index(directory):
    path = os.path.join(directory, INDEX)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON index ({str(e)[:200]})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                           and v == os.path.basename(v) and v not in ("", ".", "..")
                                           for k, v in wm.items()):
        raise ValueError(f"{path}: corrupt index: need {{'weight_map': {{key: shard file name}}}}")
    return path, wm


def read_weights(directory) -> dict:
    """``{key: NumPy array}`` from a hub directory's ``model.safetensors``, or its shards listed
    in ``model.safetensors.index.json`` (every key checked to be in the shard the index names,
    and every shard's keys in the index), or, with torch installed, ``pytorch_model.bin``."""
    directory = os.fspath(directory)
    single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
    if os.path.isfile(single):
        return _read_file(single)
    if not os.path.isfile(index):
        if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
            return read_state_dict(os.path.join(directory, "pytorch_model.bin"))
        what = (f"holds {sorted(os.listdir(directory))}" if os.path.isdir(directory)
                else "does not exist")
        raise FileNotFoundError(f"{directory}: no {SINGLE} and no {INDEX} (the directory "
                                f"{what})")
    index, wm = _read_index(directory)
    sd, problems = {}, []
    for shard in sorted(set(wm.values())):
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index} lists the shard {shard}, which is not in "
                                    f"{directory}")
        arrays = _read_file(path)
        want = {k for k, v in wm.items() if v == shard}
        problems += [f"{k!r} is in the index but not in {path}" for k in sorted(want - set(arrays))]
        problems += [f"{k!r} is in {path} but not in the index" for k in sorted(set(arrays) - want)]
        sd.update(arrays)
    if problems:
        raise ValueError(f"{index}: the index and its shards disagree:\n  " + "\n  ".join(problems))
    return {k: sd[k] for k in wm}


def _config(directory):
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: {directory} has no {CONFIG} (a hub directory "
                                f"holds config.json and model.safetensors or its shards)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON config ({str(e)[:200]})") from None
    if not isinstance(config, dict) or config.get("model_type") not in REGISTRY:
        got = config.get("model_type") if isinstance(config, dict) else config
        raise ValueError(f"{path}: model_type {got!r} is not one fnn builds (registered: "
                         f"{sorted(REGISTRY)}; fnn.models.hub.register adds one)")
    return config


def _match_prefix(sd, model_keys, prefix):
    """A base model's keys into a model with a head (add ``prefix.``), or the reverse."""
    p = prefix + "."
    model_has, file_has = (any(k.startswith(p) for k in ks) for ks in (model_keys, sd))
    if not prefix or model_has == file_has:
        return sd
    if model_has:
        return {p + k: v for k, v in sd.items()}
    left = sorted(k for k in sd if not k.startswith(p))
    if left:
        warnings.warn(f"from_pretrained: the checkpoint's {len(left)} tensors outside "
                      f"{prefix!r} (a head: {', '.join(left[:3])}"
                      f"{', ...' if len(left) > 3 else ''})"
                      f" are not used by the base model", stacklevel=3)
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def from_pretrained(directory, dtype=None):
    """``(model, params, state)`` from a hub directory (see the module docstring).

    ``dtype``: of the params (default fnn's default float dtype). **Raises:**
    ``FileNotFoundError`` naming the directory (no ``config.json``, no weights) or the missing
    shard; ``ValueError`` for an unknown ``model_type``, a corrupt index or config, an index
    and shards that disagree; :class:`fnn.checkpoint.CheckpointError` naming a corrupt file;
    :class:`fnn.torch_weights.StateDictError` when the weights do not fit the configuration.
    """
    directory = os.fspath(directory)
    config = _config(directory)
    mod = _module(REGISTRY[config["model_type"]], f"from_pretrained: model_type "
                                                  f"{config['model_type']!r}")
    model, shape = mod.from_hf_config(config), tuple(mod.hf_input_shape(config))
    sd = read_weights(directory)
    sd = _match_prefix(sd, _run.keys(model, shape)[0], mod.HF_PREFIX)
    params, state = _run.load(model, sd, shape, dtype=dtype)
    return model, params, state


# --------------------------------------------------------------------------- writing

def _shard_size(max_shard_size):
    """Bytes from an int or a string as transformers reads it (``"5GB"`` = 5·10⁹, ``"5GiB"``
    = 5·2³⁰)."""
    if max_shard_size is None or (isinstance(max_shard_size, int)
                                  and not isinstance(max_shard_size, bool) and max_shard_size > 0):
        return max_shard_size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(max_shard_size).upper())
    if not m:
        raise ValueError(f"save_pretrained: max_shard_size is a positive int of bytes or a size "
                         f"such as '5GB' or '500MiB', got {max_shard_size!r}")
    return int(float(m[1]) * _UNITS[m[2]])


def _shards(arrays, limit):
    """Keys in order, cut into shards of at most ``limit`` bytes (a bigger tensor alone)."""
    shards, size = [[]], 0
    for k, a in arrays.items():
        if limit is not None and shards[-1] and size + a.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += a.nbytes
    return shards


def _write_file(path, arrays):
    """One safetensors file as the safetensors package lays it out: ``{"format": "pt"}``
    metadata, tensors by decreasing alignment then name."""
    names = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in names:
        a = arrays[k]
        header[k] = {"dtype": _format.CODES[a.dtype.name], "shape": list(a.shape),
                     "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in names:
            f.write(memoryview(np.ascontiguousarray(arrays[k]).reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _ours(name):
    return name in (CONFIG, SINGLE, INDEX) or bool(_SHARD.fullmatch(name))


def _keep_others(old, new):
    """Files of an existing directory that are not config or weights, linked (or copied)."""
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if _ours(name):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)


def _replace_dir(directory, fill):
    """Run ``fill(tmp)`` on a fresh directory beside ``directory``, then put it in its place."""
    target = os.path.abspath(directory)
    parent, base = os.path.dirname(target), os.path.basename(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.", suffix=".tmp")
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):
            _keep_others(target, tmp)
            old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.", suffix=".old")
            os.rename(target, os.path.join(old, base))
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(os.path.join(old, base), target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_weights(directory, state_dict, config, max_shard_size=None) -> str:
    """Write ``config`` (a dict) as ``config.json`` and ``state_dict`` (``{key: array}``) as
    ``model.safetensors`` or, when larger than ``max_shard_size`` (bytes, or ``"5GB"``), as
    shards with their index, into ``directory``, atomically (see the module docstring).
    Returns ``directory``."""
    arrays = {}
    for k, v in state_dict.items():
        a = np.asarray(v)
        if a.dtype.name not in _format.CODES:
            raise TypeError(f"write_weights: {k!r} has dtype {a.dtype}, which safetensors "
                            f"cannot hold")
        arrays[str(k)] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    shards = _shards(arrays, _shard_size(max_shard_size))

    def fill(tmp):
        _write_json(os.path.join(tmp, CONFIG), config)
        if len(shards) == 1:
            return _write_file(os.path.join(tmp, SINGLE), arrays)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards):
            _write_file(os.path.join(tmp, name), {k: arrays[k] for k in keys})
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        total = {"total_parameters": sum(a.size for a in arrays.values()),
                 "total_size": sum(a.nbytes for a in arrays.values())}
        _write_json(os.path.join(tmp, INDEX),
                    {"metadata": total, "weight_map": dict(sorted(weight_map.items()))})
    _replace_dir(directory, fill)
    return os.fspath(directory)


def _module_of(model):
    """The registered module whose constructor built ``model`` (``model.spec``'s module)."""
    made_by = model.spec[0] if model.spec else None
    for model_type, path in REGISTRY.items():
        if path == made_by:
            return model_type, path
    raise ValueError(f"save_pretrained: {model.name} (kind {model.kind!r}, built by "
                     f"{made_by or 'an unknown constructor'}) is not built by a registered hub "
                     f"module ({sorted(set(REGISTRY.values()))}); fnn.models.hub.register adds one")


def save_pretrained(directory, model, params, state, max_shard_size=None, *, dtype=None) -> str:
    """Write ``model``'s ``params``/``state`` as a hub directory ``transformers``'
    ``from_pretrained`` loads: ``config.json`` from the model module's ``hf_config(model)``
    (with ``"dtype"`` added when absent), the weights by :func:`fnn.torch_weights.state_dict`
    without tied aliases, sharded when larger than ``max_shard_size`` (bytes or ``"5GB"``),
    atomically. ``dtype``: cast the float weights (default: as the params are).
    Returns ``directory``.
    """
    model_type, path = _module_of(model)
    mod = _module(path, f"save_pretrained: model_type {model_type!r}")
    config = dict(mod.hf_config(model))
    if config.get("model_type") != model_type:
        raise ValueError(f"save_pretrained: {path}.hf_config gave model_type "
                         f"{config.get('model_type')!r}, registered as {model_type!r}")
    sd, aliases = _run.save(model, params, state, mod.hf_input_shape(config), dtype=dtype)
    sd = {k: v for k, v in sd.items() if k not in aliases}
    floats = sorted({v.dtype.name for v in sd.values() if _sinks.is_float(v.dtype)})
    if len(floats) == 1:
        config.setdefault("dtype", floats[0])
    return write_weights(directory, sd, config, max_shard_size)

