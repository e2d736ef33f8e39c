"""Data sources: the built-in procedural stream and real images, behind one DataSource contract."""

from __future__ import annotations

from convscale.data.config import DATA_KINDS, DataConfig, DataSource
from convscale.errors import UserError


def build_source(cfg: DataConfig) -> DataSource:
    """The data source a config names (imports only the kind asked for)."""
    if cfg.resolution < 8:
        raise UserError(f"data resolution must be >= 8 px, got {cfg.resolution}")
    if cfg.kind == "procedural":
        from convscale.data.procedural import ProceduralSource

        return ProceduralSource(cfg)
    if cfg.kind == "folder":
        from convscale.data.folder import FolderSource

        return FolderSource(cfg)
    if cfg.kind == "shards":
        from convscale.data.shards import ShardSource

        return ShardSource(cfg)
    if cfg.kind == "arrays":
        from convscale.data.arrays import ArraySource

        return ArraySource(cfg)
    if cfg.kind == "digits":
        from convscale.data.arrays import DigitsSource

        return DigitsSource(cfg)
    raise UserError(f"unknown data kind '{cfg.kind}'; use one of {', '.join(DATA_KINDS)}")


__all__ = ["DATA_KINDS", "DataConfig", "DataSource", "build_source"]
