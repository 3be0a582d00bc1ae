"""Announcing results: the outbox sender and its MQTT, webhook and file targets."""
