"""Configuration: one declarative schema (schema.py), a validating loader (loader.py) and the
generator of the documented ``conf/empath.yaml`` (template.py)."""

from empath.config.loader import Config, ConfigError, Namespace, load_config
from empath.config.types import Address, parse_address, parse_duration, parse_size

__all__ = ["Address", "Config", "ConfigError", "Namespace", "load_config", "parse_address",
           "parse_duration", "parse_size"]
