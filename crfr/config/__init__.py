"""Typed configuration: ``params.yaml`` loaded into validated objects.

``params.yaml`` is the single source of every knob. Its top level holds the default (demo) settings, a
``profile`` name and a ``profiles`` mapping whose entries are deep-merged over the defaults, so that
``profile: paper`` switches to the paper's full setting without a second file. Values may be overridden
from the command line with ``--set section.key=value`` (parsed as YAML).

Validation is strict: an unknown key, a wrong type or an out-of-range value raises :class:`~crfr.errors.ConfigError`
naming the dotted key, what is allowed and where the value came from (the file, a profile in it, a ``--set``
argument or an environment variable). Integers and booleans are strict (YAML 1.1 reads ``yes`` as True, and
a lax integer would take True as 1), numbers must be finite, and every profile of the file is validated on
load, not only the selected one, so that a typo in a profile nobody runs today is found today.

The package holds one idea per module: :mod:`~crfr.config.base` (the strict section base and scalar types),
the sections (:mod:`~crfr.config.data`, :mod:`~crfr.config.degrade`, :mod:`~crfr.config.model`,
:mod:`~crfr.config.training`, :mod:`~crfr.config.evaluation`, :mod:`~crfr.config.infrastructure`,
:mod:`~crfr.config.serving`), :mod:`~crfr.config.params` (all of them as :class:`Params`),
:mod:`~crfr.config.load` (file, profiles, overrides, environment and credentials) and
:mod:`~crfr.config.steps` (which params each pipeline step reads). The names below are its public API.
"""

from crfr.config.base import MAX_EPOCHS, MAX_SEED, Bool, Float, Int, Range, Section
from crfr.config.data import LFW_ROOT_ENV, DataCfg, EvalSetCfg
from crfr.config.degrade import DegradeCfg
from crfr.config.evaluation import REALISTIC_TEST_DEGRADE, EvaluateCfg, EvidenceCfg, RegisterCfg, UnalignedCfg
from crfr.config.infrastructure import KubeflowCfg, StorageCfg, TrackingCfg
from crfr.config.load import (
    DEFAULT_PARAMS,
    ENV_KEYS,
    TRACKING_URI_ENV,
    deep_merge,
    load_params,
    params_from_json,
    parse_overrides,
    resolve_tree,
)
from crfr.config.model import LossCfg, ModelCfg
from crfr.config.params import REPO_PARAMS_KEYS, Params, flatten
from crfr.config.serving import GalleryCfg, ServeCfg
from crfr.config.training import (
    AblationRow,
    AugmentCfg,
    ExternalTeacherCfg,
    OptimCfg,
    RuntimeCfg,
    StudentCfg,
    TeacherCfg,
)

__all__ = [
    "DEFAULT_PARAMS", "ENV_KEYS", "LFW_ROOT_ENV", "MAX_EPOCHS", "MAX_SEED", "REALISTIC_TEST_DEGRADE",
    "REPO_PARAMS_KEYS", "TRACKING_URI_ENV", "AblationRow", "AugmentCfg", "Bool", "DataCfg", "DegradeCfg",
    "EvalSetCfg", "EvaluateCfg", "EvidenceCfg", "ExternalTeacherCfg", "Float", "GalleryCfg", "Int", "KubeflowCfg", "LossCfg",
    "ModelCfg", "OptimCfg", "Params", "Range", "RegisterCfg", "RuntimeCfg", "Section", "ServeCfg", "StorageCfg",
    "StudentCfg", "TeacherCfg", "TrackingCfg", "UnalignedCfg", "deep_merge", "flatten", "load_params", "params_from_json",
    "parse_overrides", "resolve_tree",
]
