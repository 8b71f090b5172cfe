"""Application layer: the batch engine and block <-> cache conversions."""
