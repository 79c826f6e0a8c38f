"""Models: scale schedules, BSQ VAE, Infinity transformer, T5 text conditioning, checkpoints and presets."""
