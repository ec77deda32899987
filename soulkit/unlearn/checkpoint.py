"""The checkpoint format of the long jobs in :mod:`soulkit.unlearn` (training, unlearning). It is
:mod:`soulkit._checkpoint`, shared with ``soulkit train``; this module keeps its names importable here."""

from .._checkpoint import (
    INFO_FILE,
    MODEL_FILE,
    STATES_FILE,
    drop_tied_weights,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["INFO_FILE", "MODEL_FILE", "STATES_FILE", "save_checkpoint", "load_checkpoint", "has_checkpoint",
           "drop_tied_weights"]
