"""The defense pipeline: the config schemas as Hydra stores them, the run's stages and what they run
(dataset loading, the sweep, fine-tuning, the criterion's operating point, the fine-tuning ablation)."""
