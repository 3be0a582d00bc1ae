"""Pure mapping: template + event context -> export body (selectors, sandboxed expressions, routes)."""
