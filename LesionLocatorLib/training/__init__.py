"""Training of the LesionLocator-Lite model on synthetic lesions (`lesionlocator train`) and its validation."""
from .plans import LiteModelConfig, build_lite_network, make_dataset_json, make_plans, write_model_root
from .trainer import TrainingOptions, dice_ce_loss, export_model, train

__all__ = ["LiteModelConfig", "TrainingOptions", "build_lite_network", "dice_ce_loss", "export_model", "make_dataset_json",
           "make_plans", "train", "write_model_root"]
