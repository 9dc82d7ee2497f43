"""Built-in nodes, one module per family. They use only the public ``flowchat`` surface."""
