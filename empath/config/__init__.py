"""Configuration: one declarative schema (schema.py), a validating loader (loader.py), the
generator of the documented ``conf/empath.yaml`` (template.py), which file is read and the
embedded default (defaults.py, default.yaml), check-config's warnings (checks.py), the
listeners' certificates, self-signed by default (tlsfiles.py), and the configuration's types
(typed.py, written from the schema by typegen.py)."""

from empath.config.loader import ConfigError, ConfigErrors, Namespace, load_config
from empath.config.typed import Config
from empath.config.types import Address, parse_address, parse_duration, parse_size

__all__ = ["Address", "Config", "ConfigError", "ConfigErrors", "Namespace", "load_config",
           "parse_address", "parse_duration", "parse_size"]
