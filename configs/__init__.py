"""The shipped training configs and model specs, importable as ``mame_fast.configs`` (see pyproject.toml)."""
