"""The model: configs and JSON presets, tower families, the log-mel front end and SynergyModel.

Also the tokenizer, checkpoints and the reconstruction heads.
"""
