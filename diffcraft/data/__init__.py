"""Datasets (MDB-stem-synth, a folder of audio, a synthetic instrument) and the feature cache."""
