"""x3dnet: the X3D family of efficient video recognition networks (Feichtenhofer, CVPR 2020).

    import x3dnet
    model = x3dnet.create_model("x3d_m", pretrained=True).eval()
    probs = model(clips).softmax(1)  # clips: (B, 3, 16, 224, 224), normalised RGB
"""

from .checkpoint import Checkpoint, convert_checkpoint, load_checkpoint, load_weights, save_checkpoint
from .errors import CheckpointError, ConfigError, DownloadError, X3DNetError
from .factory import create_model
from .model import VARIANTS, X3D, X3DConfig, derive_config, get_config
from .recipe import RECIPES, Recipe
from .weights import WEIGHTS, WeightsRecord, download_weights, get_weights

__version__ = "0.1.0"

__all__ = [
    "RECIPES", "VARIANTS", "WEIGHTS", "X3D", "Checkpoint", "CheckpointError", "ConfigError", "DownloadError",
    "Recipe", "WeightsRecord", "X3DConfig", "X3DNetError", "convert_checkpoint", "create_model",
    "derive_config", "download_weights", "get_config", "get_weights", "load_checkpoint", "load_weights",
    "save_checkpoint",
]
