"""Durable state behind the Store protocol: `base` is the port, `factory` picks the engine."""
