"""Core: config and artifact IO, the architecture table, exit models sharing the base's weights, cost and depth policy."""
