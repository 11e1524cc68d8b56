"""Shipped configs: `--config configs/NAME.py` (or NAME) finds these from any directory."""
