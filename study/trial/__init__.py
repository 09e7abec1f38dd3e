"""A trial, as it runs in Ray's processes: the trainable, the training loop and the runtime error protocol.
Importing this package imports none of its modules: the driver side reads only :mod:`study.trial.errors`."""
