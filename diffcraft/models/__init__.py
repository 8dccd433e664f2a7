"""Models: the DDSP decoder (`decoder`), the audio encoder with its F0 and loudness decoders
(`encoders`), and DiffCraft, the two joined by training stage (`autoencoder`)."""
