"""Scripts and modules that serve the notebook: running it, checking it, fetching MNIST.

A regular package, so that ``import tools.x`` finds this folder even where another
distribution installs a top-level ``tools`` namespace.
"""
