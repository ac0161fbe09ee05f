"""The operator contract: event kinds, alarm kinds, typed payloads, row/page types (shared by every layer)."""
