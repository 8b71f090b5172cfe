"""Domain layer: geometry (value objects), blocks (entities), the pool (services), errors."""
