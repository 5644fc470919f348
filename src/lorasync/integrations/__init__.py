"""Integrations of lorasync's sync into other training libraries (TRL: `lorasync.integrations.trl`)."""
