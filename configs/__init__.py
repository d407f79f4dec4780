"""leanlm.configs: the YAML presets (package data), reachable by name: ``leanlm train tiny``."""
