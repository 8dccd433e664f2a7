"""Differentiable synthesis: pure functions in `core`, processors in `synths`."""
