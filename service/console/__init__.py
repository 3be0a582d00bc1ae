"""The operator console at /ui: server-rendered pages over the store, live through SSE."""
