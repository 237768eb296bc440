"""The recipe's sections as typed objects: the bottom layer every other package imports.

Each section is defined once, with its defaults and descriptions (pydantic v2, ``extra="forbid"``). The engine,
the data pipeline and the launcher receive these objects, never dicts they re-parse. Nothing here imports torch.
Loading a YAML file (line numbers, did-you-mean, cross-section rules) is the launcher's job
(``encdec.launcher.recipe.validate``); the whole-recipe model is ``encdec.launcher.recipe.schema.Recipe``.
"""

from encdec.config.base import Section
from encdec.config.cluster import ClusterSection, SlurmSection
from encdec.config.data import SYNTHETIC_KINDS, AugmentSection, DataSection, DataSource, ReaderSection, SyntheticSpec
from encdec.config.model import MODEL_PREFIXES, AuxDecoderSpec, ModelSection, NeckSpec, PeftSection
from encdec.config.names import (
    BEST_DEFAULTS,
    HLS_BANDS,
    HLS_MEANS,
    HLS_STDS,
    LOSSES,
    PRECISIONS,
    STRATEGIES,
    TASKS,
)
from encdec.config.precision import PrecisionError, cpu_has_bf16, resolve_precision
from encdec.config.train import LossSection, OptimSection, RunSection, TrainSection

__all__ = [
    "BEST_DEFAULTS",
    "HLS_BANDS",
    "HLS_MEANS",
    "HLS_STDS",
    "LOSSES",
    "MODEL_PREFIXES",
    "PRECISIONS",
    "STRATEGIES",
    "SYNTHETIC_KINDS",
    "TASKS",
    "AugmentSection",
    "AuxDecoderSpec",
    "ClusterSection",
    "DataSection",
    "DataSource",
    "LossSection",
    "ModelSection",
    "NeckSpec",
    "OptimSection",
    "PeftSection",
    "PrecisionError",
    "ReaderSection",
    "RunSection",
    "Section",
    "SlurmSection",
    "SyntheticSpec",
    "TrainSection",
    "cpu_has_bf16",
    "resolve_precision",
]
