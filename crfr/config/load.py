"""Loading params: the file, its profiles, ``--set`` overrides and the environment, validated into :class:`Params`.

The selected profile is deep-merged over the file's defaults, then ``--set`` overrides, then the environment
(:data:`ENV_KEYS`). A password in the effective ``tracking.uri`` is moved to MLflow's credential variables
before validation (:func:`_take_credentials`), so params never hold it. Every other profile of the file is
validated too. Errors are :class:`ConfigError` naming the dotted key, what is allowed and where the value came
from.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from crfr import secrets
from crfr.config.data import LFW_ROOT_ENV
from crfr.config.params import Params
from crfr.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
TRACKING_URI_ENV = secrets.MLFLOW_URI_ENV
ENV_KEYS = {LFW_ROOT_ENV: "data.root", TRACKING_URI_ENV: "tracking.uri"}


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge ``over`` onto a copy of ``base``; mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set_dotted(tree: dict, dotted: str, value: Any, item: str) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section (another --set gave it a value)")
        node = nxt
    if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
        raise ConfigError(f"--set {item!r}: {dotted!r} is a section that another --set already fills")
    node[parts[-1]] = value


def _yaml_problem(exc: yaml.YAMLError, line: bool = True) -> str:
    """PyYAML's multi-line message reduced to one line: what went wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    where = f"line {mark.line + 1}, column {mark.column + 1}" if line else f"column {mark.column + 1}"
    return f"{problem} ({where})"


def parse_overrides(items: list[str] | None) -> dict:
    """``["teacher.epochs=1", "data.align=none"]`` -> nested dict, values parsed as YAML.

    Raises:
        ConfigError: an argument is not ``dotted.key=value`` or its value is not YAML; names the argument.
    """
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key must be dotted names, e.g. teacher.epochs=1")
        try:
            if raw and _expanded_size(yaml.compose(raw, Loader=yaml.SafeLoader)) > MAX_EXPANDED_NODES:
                raise ConfigError(f"--set {key}=...: its YAML aliases expand to more than {MAX_EXPANDED_NODES:,} "
                                  "values (an alias bomb?)")
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            problem = _yaml_problem(exc, line=False)
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {problem}") from None
        _set_dotted(tree, key, value, item)
    return tree


Sources = list[tuple[tuple, str]]


def _leaf_keys(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Key paths of every non-mapping value in a nested mapping."""
    if isinstance(tree, dict) and tree:
        return [k for key, value in tree.items() for k in _leaf_keys(value, prefix + (key,))]
    return [prefix] if prefix else []


def _override_sources(items: list[str] | dict | None) -> Sources:
    if isinstance(items, dict):
        return [(k, "override " + ".".join(map(str, k))) for k in _leaf_keys(items)]
    sources: Sources = []
    for item in reversed(items or []):  # a later --set of the same key wins
        key = item.split("=", 1)[0].strip()
        sources.append((tuple(key.split(".")), f"--set {item}"))
    return sources


def _source_of(loc: tuple, sources: Sources, fallback: str) -> str:
    """Who set the value at ``loc``: a source whose key holds it, else one whose key it holds, else ``fallback``."""
    for key, label in sources:
        if loc[: len(key)] == key:
            return label
    if loc:  # a section-level check (e.g. wavesim needs kd) fails because of a key set inside it
        for key, label in sources:
            if key[: len(loc)] == loc:
                return label
    return fallback


def _describe(error: ValidationError, sources: Sources, fallback: str, header: str = "invalid params") -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = _source_of(tuple(err["loc"]), sources, fallback)
        if err["type"] == "extra_forbidden":
            parent = _model_at(Params, err["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "see params.yaml"
            lines.append(f"{where}: unknown key '{loc}'; allowed keys here: {allowed}")
        elif err["type"] == "value_error":
            lines.append(f"{where}: '{loc}': {err['msg'].removeprefix('Value error, ')}")
        else:
            got = err.get("input")
            hint = " (YAML reads yes/no/on/off/true/false as booleans)" if isinstance(got, bool) else ""
            lines.append(f"{where}: '{loc}': {err['msg']} (got {got!r}){hint}")
    if len(lines) == 1:
        return f"{header}: {lines[0]}"
    return f"{header}:\n  " + "\n  ".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config section class at a validation error's location, if it is a plain nested section."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _profiles(raw: dict, where: str) -> dict[str, dict]:
    profiles = raw.get("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{where}: 'profiles' must be a mapping of profile name -> settings")
    for name, body in profiles.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{where}: 'profiles.{name}' must be a mapping of settings, got {body!r}")
    return {str(name): body or {} for name, body in profiles.items()}


def resolve_tree(raw: dict, overrides: dict | None = None, where: str = "params") -> dict:
    """Apply the selected profile and overrides to the raw YAML mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: params must be a YAML mapping at the top level")
    profiles = _profiles(raw, where)
    raw = copy.deepcopy(raw)
    raw.pop("profiles", None)
    overrides = overrides or {}
    profile = overrides.get("profile", raw.get("profile", "demo"))
    if not isinstance(profile, str):
        raise ConfigError(f"{where}: 'profile' must be a profile name, got {profile!r}")
    if profile != "demo" or profile in profiles:
        if profile not in profiles:
            raise ConfigError(f"profile {profile!r} is not defined; allowed: {sorted(profiles) or ['demo']}")
        raw = deep_merge(raw, profiles[profile])
    return deep_merge(raw, overrides)


def _check_other_profiles(raw: dict, active: str, where: str) -> None:
    """Every profile of the file, merged over the file's defaults, must validate (without --set or env)."""
    profiles = _profiles(raw, where)
    base = {k: v for k, v in raw.items() if k != "profiles"}
    for name, body in profiles.items():
        if name == active:
            continue
        tree = deep_merge(base, body)
        tree["profile"] = name
        try:
            Params.model_validate(tree)
        except ValidationError as exc:
            sources = [(k, f"{where}, profiles.{name}") for k in _leaf_keys(body)]
            header = f"invalid params in profile {name!r} (not selected, but every profile is checked on load)"
            raise ConfigError(_describe(exc, sources, f"{where} (defaults, under profile {name!r})", header)) from None


def _take_credentials(tree: Any) -> bool:
    """Move a password in the tree's ``tracking.uri`` into MLflow's credential variables; leave it redacted.

    Params are written to config.json, MLflow params and pipeline specs, so they keep only ``user:***@``; the
    password moves to MLflow's credential variables, which the steps this process starts inherit
    (:func:`crfr.secrets.take_tracking_credentials`). Called on the resolved tree, before validation, so it
    sees the URI whichever source gave it; a value that is not a string is left for validation to refuse.

    Returns:
        Whether the URI changed (it held a password).
    """
    tracking = tree.get("tracking") if isinstance(tree, dict) else None
    uri = tracking.get("uri") if isinstance(tracking, dict) else None
    if not isinstance(uri, str):
        return False
    secrets.take_tracking_credentials(uri)
    tracking["uri"] = secrets.redact_uri(uri)
    return tracking["uri"] != uri


def _read_params_file(file: Path) -> dict:
    if file.is_dir():
        raise ConfigError(f"params file {file} is a folder, not a YAML file (give --params the file itself)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"params file {file} could not be read: {exc}") from None
    try:
        expanded = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if expanded > MAX_EXPANDED_NODES:
            raise ConfigError(f"{file}: its YAML aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias "
                              "bomb?); write the values out, or use fewer nested aliases")
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {_yaml_problem(exc)}") from None
    return raw if raw is not None else {}


# A params file is a few hundred values; aliases nested in aliases can make a few lines mean billions, which
# merging and validating would then build.
MAX_EXPANDED_NODES = 100_000


def _expanded_size(root) -> int:
    """How many values the composed YAML ``root`` stands for once every alias is expanded.

    Aliases are shared nodes, so each node's size is computed once (memoised): time and memory follow the
    text, not the expansion. Stops counting past the limit.
    """
    if root is None:
        return 0
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if not children_done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        # A child still unsized here is an ancestor (a recursive alias): count it once.
        sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in children), MAX_EXPANDED_NODES + 1)
    return sizes[id(root)]


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Params:
    """Load, merge and validate params.

    Args:
        path: a params.yaml; None means ./params.yaml, and the built-in defaults if that does not exist.
        overrides: ``section.key=value`` strings (``--set`` arguments) or a nested dict, applied last.

    Raises:
        ConfigError: the file is unreadable, or any value of the selected profile, any other profile of the
            file, or an override is invalid; the message names the key and where its value came from.
    """
    raw: dict = {}
    file = Path(path) if path is not None else DEFAULT_PARAMS
    if file.exists():
        raw = _read_params_file(file)
    elif path is not None:
        raise ConfigError(f"params file not found: {file}")
    where = str(file) if file.exists() else "built-in defaults"
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    tree = resolve_tree(raw, over, where)
    profile = tree.get("profile", "demo")
    sources = _override_sources(overrides)
    for env, dotted in ENV_KEYS.items():
        if os.environ.get(env):
            section, key = dotted.split(".")
            tree.setdefault(section, {})[key] = os.environ[env]
            sources.insert(0, ((section, key), f"${env}"))
    if isinstance(profile, str) and isinstance(raw.get("profiles"), dict) and profile in raw["profiles"]:
        sources += [(k, f"{where}, profiles.{profile}") for k in _leaf_keys(raw["profiles"][profile] or {})]
    _take_credentials(tree)
    try:
        params = Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, where)) from None
    _check_other_profiles(raw, params.profile, where)
    return params


def params_from_json(text: str) -> Params:
    """Rebuild params serialized with ``params.model_dump_json()`` (how kfp passes them between steps).

    Raises:
        ConfigError: the text is not JSON of valid params; the message names the key.
    """
    try:
        tree = json.loads(text)
    except ValueError:
        tree = None  # not JSON: pydantic says so below, in the same words as for any other invalid input
    if _take_credentials(tree):
        text = json.dumps(tree)
    try:
        return Params.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, [], "params JSON")) from None

