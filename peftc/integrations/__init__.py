"""Glue for the tools people train with: transformers' Trainer (and what builds on it, TRL)."""
