"""The plumbing of DoRA.ipynb, one module per concern; the notebook reaches it through
``helpers.py``. Nothing here imports ``tools/`` (the maintainers' scripts) or edits ``sys.path``.
"""
