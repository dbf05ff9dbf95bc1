"""Sub-commands of the ``tensorgraph`` CLI, one module each (see tensorgraph.cli)."""
