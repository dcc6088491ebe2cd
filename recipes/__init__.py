"""Shipped Hydra recipes and config groups (package data)."""
