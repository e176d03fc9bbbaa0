"""Data: where the images are (`sources`), the preprocessing the model is fed with (`preprocessing`,
`transforms`), and two ways to load them: decoded once into memory (`memory`, small images) or streamed by
DataLoader workers (`stream`, any size). `load_data` builds a run's `DataBundle`."""

from pipeline.core.data.augment import random_crop_flip
from pipeline.core.data.bundle import DataBundle, choose_loader, load_data
from pipeline.core.data.config import DATA_VERSION, EVAL_ONLY_FIELDS, NEUTRAL_FIELDS, AugmentConfig, DataConfig
from pipeline.core.data.memory import Split, TensorLoader
from pipeline.core.data.preprocessing import DATASET_STATS, has_weights, resolve_preprocessing
from pipeline.core.data.sources import (
    TORCHVISION_LAYOUT,
    DataIndex,
    DataNotFoundError,
    DataSource,
    FileList,
    balanced_subset,
    class_names,
    default_data_root,
    locate,
    scan,
    stratified_split,
)
from pipeline.core.data.stream import StreamLoader
from pipeline.core.data.transforms import Preprocessing

__all__ = [
    "DATA_VERSION",
    "DATASET_STATS",
    "EVAL_ONLY_FIELDS",
    "NEUTRAL_FIELDS",
    "TORCHVISION_LAYOUT",
    "AugmentConfig",
    "DataBundle",
    "DataConfig",
    "DataIndex",
    "DataNotFoundError",
    "DataSource",
    "FileList",
    "Preprocessing",
    "Split",
    "StreamLoader",
    "TensorLoader",
    "balanced_subset",
    "choose_loader",
    "class_names",
    "default_data_root",
    "has_weights",
    "load_data",
    "locate",
    "random_crop_flip",
    "resolve_preprocessing",
    "scan",
    "stratified_split",
]
