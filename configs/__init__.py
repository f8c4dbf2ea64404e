"""ml_collections configs (big_vision style): `get_config()` returns a ConfigDict; `model_configs(cfg)` turns its
`model` section into the package's config dataclasses."""
