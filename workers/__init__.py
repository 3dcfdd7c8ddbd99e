"""tfpool's worker side: supervisor, worker processes, batcher, model loading, CLI.

Importing this package does not import TensorFlow; only a worker process does, in
:mod:`workers.model`, after its device environment is set.
"""
