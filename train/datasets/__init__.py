"""Data sets written as real files and manifests: the synthetic set (synth), its videos (synth_video), and a folder
of videos turned into a manifest (from_videos)."""
