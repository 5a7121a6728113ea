"""``python -m lightning_sr.callbacks NAME`` prints the path of a shipped callback YAML (no name: lists them)."""

import sys

from lightning_sr.callbacks import CONFIGS, config_path

if len(sys.argv) == 2:
    print(config_path(sys.argv[1]))
else:
    print("usage: python -m lightning_sr.callbacks NAME   (NAME: " + ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml"))) + ")")
    sys.exit(2)
