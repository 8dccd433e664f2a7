"""Models: the DDSP decoder (and, next, the encoders and the autoencoder)."""
