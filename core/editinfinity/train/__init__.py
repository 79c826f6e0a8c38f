"""Training loops for the BSQ VAE and the Infinity transformer, and the driver that trains the ``toy`` preset.

``vae.train_vae`` and ``transformer.train_transformer`` take a config dataclass (YAML in ``configs/``), a run
directory and a device; ``toy`` chains them within time budgets and writes a weights directory that
``load_models(weights=DIR)`` reads; ``evaluate`` judges the results with ``toyworld.analyse``.
"""
