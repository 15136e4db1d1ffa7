"""Configuration, read from `queuegate.toml`: its shape (`schema.py`), loading with `${ENV}` and errors that name
the key (`load.py`), the rules a type cannot express (`checks.py`), where it puts things (`paths.py`), what a reload
may change live (`reload.py`), and the commented template `queuegate init` writes (`template.py`)."""

from queuegate.config.checks import parse_listen
from queuegate.config.load import build_config, load_config, parse_config
from queuegate.config.paths import admin_socket_path, memory_db_path, usage_db_path, usage_timezone
from queuegate.config.schema import (
    AffinityConfig,
    Config,
    ConfigError,
    ContainerSpec,
    DeviceConfig,
    Endpoint,
    FleetConfig,
    KeyConfig,
    Kind,
    MemoryConfig,
    ModelConfig,
    NodeConfig,
    NodeKeyConfig,
    NodesConfig,
    PolledNodeConfig,
    QueueConfig,
    ServerConfig,
    ToolMode,
    ToolsConfig,
    ToolServerConfig,
    UpstreamDefaults,
    UsageConfig,
)

__all__ = [
    "AffinityConfig",
    "Config",
    "ConfigError",
    "ContainerSpec",
    "DeviceConfig",
    "Endpoint",
    "FleetConfig",
    "KeyConfig",
    "Kind",
    "MemoryConfig",
    "ModelConfig",
    "NodeConfig",
    "NodeKeyConfig",
    "NodesConfig",
    "PolledNodeConfig",
    "QueueConfig",
    "ServerConfig",
    "ToolMode",
    "ToolServerConfig",
    "ToolsConfig",
    "UpstreamDefaults",
    "UsageConfig",
    "admin_socket_path",
    "build_config",
    "load_config",
    "memory_db_path",
    "parse_config",
    "parse_listen",
    "usage_db_path",
    "usage_timezone",
]
