"""Pure mapping: template + event context -> export body (selectors, expressions, routes)."""
