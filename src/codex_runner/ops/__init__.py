"""Operations: doctor checks, retention, backup/restore, metrics, audit, diagnostics."""
