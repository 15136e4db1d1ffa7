"""Coming from another tool: `queuegate import` turns a llama-swap, Docker swap proxy or RoleMesh config into a
commented queuegate.toml (one module per format, each naming what it cannot carry over), and `environment` serves
the original proxy's environment variables when there is no config file."""

from __future__ import annotations

from pathlib import Path

import yaml

from queuegate.config.importers import llama_swap, rolemesh, swap_proxy
from queuegate.config.importers._draft import Draft, ImportFailed
from queuegate.config.importers.environment import config_from_environment

FORMATS = {"llama-swap": llama_swap, "swap-proxy": swap_proxy, "rolemesh": rolemesh}

__all__ = ["FORMATS", "Draft", "ImportFailed", "config_from_environment", "import_file"]


def import_file(path: str | Path, tool: str | None = None) -> tuple[str, Draft]:
    """(format, draft) of the YAML config at `path`, its format told from its content unless `tool` names it."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ImportFailed(f"cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ImportFailed(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ImportFailed("expected a YAML mapping at the top (a config with `models:`)")
    if tool is None:
        matching = [name for name, module in FORMATS.items() if module.looks_like(data)]
        if len(matching) != 1:
            which = " or ".join(matching or FORMATS)
            raise ImportFailed(f"cannot tell whether it is a {which} config; name it with --from")
        tool = matching[0]
    return tool, FORMATS[tool].convert(data)
