"""forgetless: continual-learning experiment grids on Ray, tracked in MLflow.

The packages are the top-level folders of the repository (core, streams, models,
strategies, experiments), linked here so that `forgetless.<package>` resolves for Python
and for the tools that read the source.
"""
