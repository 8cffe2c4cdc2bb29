"""Missing-modality reconstruction (`synergy mmr`): heads trained over a frozen checkpoint (train), their metrics
(metrics), evaluation and reconstruction files (evaluate), and a log-mel back to a waveform (audio)."""
