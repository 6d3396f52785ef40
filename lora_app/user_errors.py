"""The exceptions that mean "bad input": shown to the user as one plain line, never as a traceback."""

from .adapters import AdapterError, ExportError
from .adapters.gguf import GGUFError
from .adapters.push import PushError
from .checkpoints import CheckpointError
from .config import ConfigError
from .data import DataError
from .hub import HubError
from .lora import LoraError
from .models import ModelError

USER_ERRORS: tuple[type[Exception], ...] = (AdapterError, CheckpointError, ConfigError, DataError, ExportError,
                                             GGUFError, HubError, LoraError, ModelError, PushError)
