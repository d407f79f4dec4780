"""leanlm.engine.config: typed run configuration, validated once.

A run's config comes from a YAML preset (``configs/*.yaml``, which may ``extends:`` another
preset) plus dotted command-line overrides (``optim.lr=3e-4 train.steps=2000``). ``load_config``
merges them, coerces every value to its field's type and validates the whole thing, raising one
``ConfigError`` that lists every problem (unknown keys get a "did you mean" suggestion).

    schema    the dataclasses: defaults, help, choices and bounds per field; ``describe_keys``
    validate  choices, bounds and the rules that span fields
    load      YAML, ``extends:``, overrides, coercion, ``load_config``, ``save_yaml``
"""

from leanlm.engine.config.load import (
    build_config,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    save_yaml,
)
from leanlm.engine.config.schema import (
    LOST_DEFAULT_RANKS,
    MAX_VOCAB,
    SECTION_TYPES,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LogConfig,
    LOSTConfig,
    ModelConfig,
    OptimConfig,
    ReweightConfig,
    RunConfig,
    TrainConfig,
    describe_keys,
    leaves,
)
from leanlm.engine.config.validate import validate

__all__ = [
    "LOST_DEFAULT_RANKS",
    "MAX_VOCAB",
    "SECTION_TYPES",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LOSTConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "ReweightConfig",
    "RunConfig",
    "TrainConfig",
    "build_config",
    "describe_keys",
    "leaves",
    "load_config",
    "merge",
    "parse_overrides",
    "read_yaml",
    "save_yaml",
    "validate",
]
