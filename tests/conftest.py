"""Test set-up: never touch the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
