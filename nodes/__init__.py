"""Built-in nodes, one module per family. They use only the public ``engine`` surface."""
