"""The render pipeline: pure state and scheduling rules, and the loops that submit and track."""
