"""Ways events come in (webhooks, MQTT): verify, dedupe, commit, and only then acknowledge."""
