"""[retention]: the daily clean-up of old rows (forwarder.retention).

Kept out of config.py (and free of forwarder.config imports) so config.py can import it
without a cycle; `Settings` carries it as
`retention: RetentionConfig = Field(default_factory=RetentionConfig, ...)`.
How long log partitions are kept stays `database.retention_days`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from forwarder.config_types import Section

__all__ = ["RetentionConfig"]


class RetentionConfig(Section):
    enabled: bool = Field(
        True,
        description="run the clean-up daily inside `forwarder run` (false: only the "
        "`forwarder retention` command, e.g. from cron, or another tool)",
    )
    hour_utc: int = Field(
        3, ge=0, le=23, description="hour of the day (UTC) at which the daily run starts"
    )
    export_dir: Path | None = Field(
        None,
        description="if set, every day partition is first exported to "
        "<export_dir>/<schema>.<partition>.jsonl.gz (gzip JSON lines, fsynced) and "
        "dropped only once that file is complete",
    )
    dead_letter_days: int = Field(
        90, ge=1, description="days of dead-letter rows to keep (by received_at)"
    )
    checks_days: int = Field(
        90,
        ge=1,
        description="days of system_checks rows to keep (by ts); the latest row of an "
        "alarm or probe that is still failing is always kept",
    )
    delete_batch_rows: int = Field(
        5000,
        ge=1,
        le=1_000_000,
        description="rows deleted (or exported) per transaction from the default "
        "partition, the dead letters and system_checks",
    )
