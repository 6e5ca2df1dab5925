"""Named train configs, one file per preset, each defining ``CONFIG = TrainConfig(...)`` (``train.config``)."""
