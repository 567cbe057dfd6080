"""Bridges from other libraries to attngen's compiled attention.

Each integration lives in its own module and is switched on by importing that module, so
importing :mod:`attngen` alone never touches a third-party library:

* :mod:`attngen.integrations.transformers`: ``attn_implementation="attngen"`` for Hugging
  Face transformers models.
"""
