"""What the reader's kernel runs, through ``helpers.py``: self-contained instruments, one each.

    mnist_files ..... MNIST on disk: verified files, else a download, checked against SHA-256
    adapter_files ... adapter files and directories, ours and PEFT's, and PEFT's parameter names
    memory .......... bytes a forward pass keeps for backward
    check_dora ...... any DoRA layer against the paper, the official code and PEFT (also a command:
                      ``python -m dora_tutorial.check_dora my_module.py:MyDoRA``)
    files ........... atomic writes: a failed write never leaves a corrupt file behind

and the plumbing that helpers.py re-exports, one module per concern: session (release check,
device, clock, seeds, wrapped text), models, data, training, stats, summary, weights (the
paper's Figure 2), plots, precision (does m train in low precision, what a merge loses),
arguments (the practitioners' layers' argument checks), cache (what DoRA keeps for inference).

Nothing here imports ``tools/`` (the maintainers' scripts) or edits ``sys.path``.
"""
