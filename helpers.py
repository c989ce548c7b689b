"""Plumbing for DoRA.ipynb, re-exported: the notebook and the scripts say ``helpers.X``, and the
code lives in the package dora_tutorial/, one module per concern: session (the release check,
device, clock, seeds, wrapped text), models (the MLP, adapters, merging, inference time, optional
PEFT parts), data (MNIST, the rotated-digits task), training (one loop, many seeds at once),
stats (paired tests, Holm, LoRA at DoRA's budget), evidence (the pooled analysis), summary
(Part I's conclusions, tables, results.json),
weights (how fine-tuning moves the weights: the paper's Figure 2 as a test), plots, precision
(low precision: does m train, what a merge loses), arguments (the practitioners' layers' argument
checks) and cache (what DoRA layers keep for unmerged inference); beside them the instruments
mnist_files, adapter_files, memory and check_dora.

Helpers never define adapter layers: they take the notebook's layer classes as arguments.
Nothing here or in dora_tutorial/ imports the maintainers' scripts (tools/).
"""

from dora_tutorial.adapter_files import (
    adapter_layers,
    load_adapter,
    load_peft_adapter,
    save_adapter,
    save_peft_adapter,
)
from dora_tutorial.arguments import (
    check_adapter_args,
    check_conv,
    check_dropout,
    check_linear,
    choose_adapter_dtype,
)
from dora_tutorial.cache import InferenceCache
from dora_tutorial.check_dora import check_dora
from dora_tutorial.data import MNIST_MEAN, MNIST_STD, Task, make_task, rotate, to_inputs
from dora_tutorial.evidence import (
    ablation_line,
    disagreements,
    findings,
    float_noise,
    held_out,
    pooled,
    rate_table,
    short,
)
from dora_tutorial.evidence import table as comparison_table
from dora_tutorial.memory import saved_tensor_bytes
from dora_tutorial.mnist_files import load_mnist
from dora_tutorial.models import (
    add_adapters,
    inference_ms,
    layer_weights,
    make_mlp,
    merge_adapters,
    optional_part,
    parameter_counts,
)
from dora_tutorial.plots import (
    plot_digits,
    plot_figure2,
    plot_idea,
    plot_learning_rates,
    plot_methods,
    plot_paired,
    plot_rank_sweep,
)
from dora_tutorial.precision import magnitude_moves, merge_error
from dora_tutorial.runtime import (
    REPO,
    WIDTH,
    __version__,
    pick_device,
    require_version,
    seed_everything,
    sync,
    timed,
    wrap,
)
from dora_tutorial.stats import Comparison, compare, compare_values, holm, lora_at_budget
from dora_tutorial.summary import results_table, run_summary, what_we_learned, write_results
from dora_tutorial.training import (
    Runs,
    accuracy,
    adamw,
    finetune,
    make_adam,
    train,
)
from dora_tutorial.weights import (
    checkpoint_correlations,
    figure2_analysis,
    figure2_conclusions,
    figure2_points,
    figure2_slopes,
    figure2_table,
    magnitude_moved,
    magnitude_table,
    relative_change,
    slope_ratio,
)

# The notebook's interface, by concern: every name here is called there (tests/test_tools.py
# checks that each exists). Other public names are the building blocks these use, tested on
# their own and used by scripts (Runs, Task, Comparison, timed, ...).
__all__ = [
    # Setup
    "require_version",
    "pick_device",
    "wrap",
    # models and adapters
    "make_mlp",
    "add_adapters",
    "parameter_counts",
    "layer_weights",
    "adapter_layers",
    "saved_tensor_bytes",
    # data
    "load_mnist",
    "rotate",
    "make_task",
    # training
    "train",
    "finetune",
    "accuracy",
    # evidence
    "compare",
    "lora_at_budget",
    "Comparison",
    "what_we_learned",
    "holm",
    "results_table",
    "run_summary",
    "write_results",
    "comparison_table",
    "disagreements",
    "rate_table",
    "short",
    "ablation_line",
    "pooled",
    "held_out",
    "float_noise",
    "findings",
    # how fine-tuning moves the weights
    "magnitude_moved",
    "magnitude_table",
    "figure2_points",
    "figure2_analysis",
    "figure2_table",
    # the practitioners' layers
    "check_adapter_args",
    "check_dropout",
    "check_linear",
    "check_conv",
    "choose_adapter_dtype",
    "InferenceCache",
    # shipping
    "merge_adapters",
    "magnitude_moves",
    "merge_error",
    "inference_ms",
    "save_adapter",
    "load_adapter",
    "save_peft_adapter",
    "load_peft_adapter",
    "check_dora",
    "optional_part",
    # plots
    "plot_idea",
    "plot_digits",
    "plot_methods",
    "plot_paired",
    "plot_rank_sweep",
    "plot_learning_rates",
    "plot_figure2",
]
