"""Loading a config: YAML presets (with ``extends:``), dotted command-line overrides, coercion of
every value to its field's type, then ``validate``; every problem is reported in one
``ConfigError``."""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import warnings
from pathlib import Path
from typing import Any

import yaml

from leanlm.engine.config.schema import SECTION_TYPES, RunConfig, field_type, item_type, shown, suggest
from leanlm.engine.config.validate import validate
from leanlm.engine.errors import ConfigError
from leanlm.engine.run_files import write_no_follow


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML without aliases. Configs never need them, and an alias tree (a "billion laughs"
    bomb: 1 KB that expands to 10^9 strings) is cheap to write and ruinous to format or copy, also
    from a downloaded checkpoint's config.yaml."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in leanlm configs", mark)
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """A config's YAML: safe, and refused in one line when it uses aliases."""
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: safe


def presets() -> dict[str, Path]:
    """The presets shipped with leanlm (``configs/*.yaml``, package data ``leanlm.configs``), by name."""
    try:
        root = Path(str(importlib.resources.files("leanlm.configs")))
    except ModuleNotFoundError:  # a source tree used without installing
        root = Path(__file__).resolve().parents[2] / "configs"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def resolve_preset(spec: str | Path) -> Path:
    """A config path, or a preset name (``tiny``, ``frugal_7b.yaml``) when no such file exists."""
    path = Path(spec)
    if path.is_file() or path.parent != Path("."):
        return path
    found = presets().get(path.name.removesuffix(".yaml"))
    if found is None:
        raise ConfigError(
            f"no config file or preset named {str(spec)!r}; presets: {', '.join(presets())} (or pass a path)"
        )
    local = path.with_name(path.name.removesuffix(".yaml") + ".yaml")
    if local.is_file() and local != path:  # a name means the preset; say which file that shadows
        warnings.warn(
            f"config {str(spec)!r} is the shipped preset {found.name}, not ./{local}; pass ./{local} for that file",
            stacklevel=2,
        )
    return found


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset (a path or a shipped preset's name), resolving ``extends: other.yaml``
    (relative to the file) recursively."""
    path = resolve_preset(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} not found; pass a path such as configs/tiny.yaml or a preset name"
        )
    if path.resolve() in _seen:
        raise ConfigError(f"config {str(path)!r} extends itself through {[str(p) for p in _seen]}")
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"config {str(path)!r} cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    _check_sections(raw, str(path))
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(
            f"config {str(path)!r}: extends must be one preset file name such as tiny.yaml, got {shown(parent)}"
        )
    return merge(read_yaml(_extended(path, parent), (*_seen, path.resolve())), raw)


def _extended(path: Path, parent: str) -> Path:
    """What ``extends: parent`` in ``path`` names: a file next to it, else a shipped preset (from a
    config in any folder, and after a pip install, where there is no configs/ folder to point at)."""
    beside = path.parent / parent
    if beside.is_file() or Path(parent).parent != Path("."):
        return beside
    found = presets().get(Path(parent).name.removesuffix(".yaml"))
    if found is None:
        raise ConfigError(
            f"config {str(path)!r}: extends {shown(parent)} is neither a file next to it ({beside}) nor a preset "
            f"({', '.join(presets())})"
        )
    return found


def _check_sections(raw: dict[str, Any], where: str) -> None:
    """Sections (and nested groups such as ``model.lost``) must be mappings: ``train: 5`` would
    otherwise vanish silently when an override of ``train.*`` is merged over it."""

    def walk(values: Any, cls: type, prefix: str) -> None:
        if values is None:
            return
        if not isinstance(values, dict):
            raise ConfigError(
                f"config {where!r}: '{prefix}' must be a mapping of keys (e.g. {prefix}: {{...}}), got {shown(values)}"
            )
        for f in dataclasses.fields(cls):
            if f.name in values and dataclasses.is_dataclass(field_type(cls, f.name)):
                walk(values[f.name], field_type(cls, f.name), f"{prefix}.{f.name}")

    for name, values in raw.items():
        if name in SECTION_TYPES:
            walk(values, SECTION_TYPES[name], name)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (sections merge key by key)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "train.steps=10"]`` -> nested dict of raw strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {shown(item)} must look like section.key=value (e.g. train.steps=100)")
        *parents, name = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {shown(item)} conflicts with another override of {part!r}")
        node[name] = value
    return out


def _coerce(value: Any, tp: Any, key: str, item: Any = None) -> Any:
    """Coerce a YAML or command-line value to the field type (``item``: a list's element type);
    raise ValueError with a reason."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{key}={shown(value)}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}={shown(value)}: expected an integer")
        try:
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={shown(value)}: expected an integer") from None
    if tp is float:
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={shown(value)}: expected a number") from None
        if not math.isfinite(f):
            raise ValueError(f"{key}={shown(value)}: expected a finite number")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}={shown(value)}: expected a string")
        return "" if value is None else str(value)
    if tp is list:
        if isinstance(value, str):
            s = value.strip()
            try:
                value = load_yaml(s) if s.startswith("[") else [v.strip() for v in s.split(",") if v.strip()]
            except yaml.YAMLError as e:
                raise ValueError(f"{key}={shown(value)}: not a YAML list ({str(e).splitlines()[0]})") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={shown(value)}: expected a list (YAML list or comma-separated)")
        if item is None:
            return list(value)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={shown(value)}: expected a mapping such as {{name: a, source: ..., weight: 1}}")
        return dict(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """One (possibly nested) config dataclass from a mapping; problems are appended, not raised."""
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            problems.append(f"unknown key '{prefix}.{k}'{suggest(k, names)}")
            continue
        tp = field_type(cls, k)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                problems.append(
                    f"'{prefix}.{k}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}"
                )
                continue
            kwargs[k] = _build(tp, v, f"{prefix}.{k}", problems)
            continue
        try:
            kwargs[k] = _coerce(v, tp, f"{prefix}.{k}", item_type(cls, k))
        except ValueError as e:
            problems.append(str(e))
    return cls(**kwargs)


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Turn a nested mapping into a validated ``RunConfig``; report every problem at once."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for sname, values in raw.items():
        if sname not in SECTION_TYPES:
            problems.append(f"unknown section '{sname}'{suggest(sname, list(SECTION_TYPES))}")
            continue
        if values is None:
            values = {}
        if not isinstance(values, dict):
            problems.append(f"section '{sname}' must be a mapping, got {shown(values)}")
            continue
        sections[sname] = _build(SECTION_TYPES[sname], values, sname, problems)
    cfg = RunConfig(**{s: sections.get(s) or SECTION_TYPES[s]() for s in SECTION_TYPES})
    problems += validate(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Preset file (optional) + dotted overrides -> validated ``RunConfig``."""
    raw = read_yaml(path) if path else {}
    return build_config(merge(raw, parse_overrides(overrides or [])))


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    write_no_follow(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode("utf-8"))
