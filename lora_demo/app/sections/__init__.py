"""One module per page section; each builds and wires its own controls."""
