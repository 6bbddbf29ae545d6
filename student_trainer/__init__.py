"""Student side of on-policy distillation: teacher client, rollouts, losses, training loop."""
