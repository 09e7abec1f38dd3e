"""The driver process of a study: input checks, the preflight of the data, the Ray runtime, the Tuner and
how the study ended (docs/architecture.md)."""
