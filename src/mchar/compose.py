"""Compose and validate the run configuration from ``conf/`` (Hydra) into a :class:`RootConfig`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mchar.config import ConfigError, RootConfig, check_semantics


def conf_dir() -> Path:
    """The ``conf/`` directory: $MCHAR_CONF_DIR, else the repository's (this package is installed editable)."""
    env = os.environ.get("MCHAR_CONF_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / "conf").resolve()


def conf_fingerprint(directory: Path | None = None) -> str:
    """Hash of every file under ``conf/`` (paths and bytes): whether two runs composed from the same config groups."""
    root = directory or conf_dir()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def frozen_conf() -> Iterator[Path]:
    """Compose from a copy of ``conf/`` taken now until the block ends ($MCHAR_CONF_DIR points at it).

    A sweep runs for hours and composes every trial afresh: an edit to ``conf/`` meanwhile (a new key the schema
    loaded at start lacks, a changed default) would fail or silently change every later trial."""
    with tempfile.TemporaryDirectory(prefix="mchar-conf-") as tmp:
        snapshot = Path(tmp) / "conf"
        shutil.copytree(conf_dir(), snapshot)
        before = os.environ.get("MCHAR_CONF_DIR")
        os.environ["MCHAR_CONF_DIR"] = str(snapshot)
        try:
            yield snapshot
        finally:
            if before is None:
                os.environ.pop("MCHAR_CONF_DIR", None)
            else:
                os.environ["MCHAR_CONF_DIR"] = before


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def _check_experiment(overrides: list[str]) -> None:
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key == "experiment" and value not in available_experiments():
            raise ConfigError(
                f"experiment: unknown experiment {value!r} (available: {', '.join(available_experiments())})"
            )


def _one_line(err: BaseException) -> str:
    """First line of the error, plus the first line of its cause (Hydra wraps the useful part)."""
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip():
        first = f"{first}: {str(cause).strip().splitlines()[0]}"
    full_key = getattr(err, "full_key", None)
    if full_key and full_key not in first:
        first = f"{full_key}: {first}"
    return first


def _yaml_line(err: BaseException) -> str:
    """A broken YAML file under ``conf/``: what is wrong, where (PyYAML's message spans several lines)."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" ({mark.name}, line {mark.line + 1})" if mark is not None else ""
    return f"{problem}{where}"


def _did_you_mean(overrides: list[str]) -> str:
    """For an override whose key the schema lacks (a typo): the closest real keys."""
    import difflib

    known = flatten(RootConfig())
    groups = {k.split(".")[0] for k in known}
    for item in overrides:
        key = item.lstrip("+~").partition("=")[0]
        if key in known or key in groups or key.startswith(("experiment", "hydra")) or "." not in key:
            continue
        close = difflib.get_close_matches(key, list(known), n=3)
        if close:
            return f" (did you mean {', '.join(close)}?)"
    return ""


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> RootConfig:
    """Hydra-compose ``conf/`` with ``overrides`` and validate it; raises :class:`ConfigError` (one line)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    overrides = list(overrides or [])
    _check_experiment(overrides)
    ConfigStore.instance().store(name="schema", node=RootConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        obj = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException, YAMLError) as err:  # YAML: a broken file under conf/
        line = _yaml_line(err) if isinstance(err, YAMLError) else _one_line(err)
        if "is not in struct" in line:  # a dict-valued field (trainer.extra): new keys need Hydra's "+"
            line += " (a new key needs a leading +: +KEY=VALUE)"
        elif "not in '" in line:  # a key the schema lacks: a typo
            line += _did_you_mean(overrides)
        raise ConfigError(f"config: {line}") from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(obj, RootConfig)
    check_semantics(obj)
    return obj


def to_yaml(cfg: RootConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: RootConfig) -> dict[str, str]:
    """Dotted-key view of the config, e.g. ``allocator.budget`` -> ``"512"``, for MLflow params."""
    from omegaconf import OmegaConf

    out: dict[str, str] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return out
