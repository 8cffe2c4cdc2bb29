"""Contrastive training: config, manifest data, the loop, evaluation and locked-tower features.

Data sets live in datasets/, missing-modality reconstruction in mmr/.
"""
