"""The notebook's plumbing, handed on: ``helpers.X`` is a name from one of the modules of
dora_tutorial/, each named for what it holds (tools/README.md maps them). The layers are the
notebook's own; what here needs one takes the layer class as an argument."""

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
from dora_tutorial.data import Task, make_task, rotate, to_inputs
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
    add_to_class,
    inference_ms,
    layer_weights,
    make_mlp,
    merge_adapters,
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
    __version__,
    import_peft,
    optional_part,
    pick_device,
    require_version,
    timed,
    wrap,
)
from dora_tutorial.stats import Comparison, compare, compare_values, holm, lora_at_budget
from dora_tutorial.summary import results_table, run_summary, what_we_learned, write_results
from dora_tutorial.training import Runs, accuracy, adamw, finetune, make_adam, train
from dora_tutorial.weight_changes import (
    checkpoint_correlations,
    figure2_analysis,
    figure2_points,
    figure2_slopes,
    figure2_table,
    magnitude_moved,
    magnitude_table,
    relative_change,
    slope_ratio,
)
