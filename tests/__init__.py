"""diffcraft's tests. A package, so every module has one import path (`tests.kit`, `tests.conftest`)."""
