"""Offline demo of on-policy distillation: a synthetic task, tiny models and the orchestration."""
