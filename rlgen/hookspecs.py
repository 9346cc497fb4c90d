"""Hook specifications: every extension point of rlgen, built-ins included.

Each hook receives a `register(name, item, description="")` callable; a plugin calls it once per item
(`register_commands` receives the typer app instead). Names are unique per kind: built-ins come first,
then plugins by distribution name, and a later item whose name is taken is dropped with a warning.
docs/plugins.md gives every hook's contract; plugins/rlgen-example implements one item of each.
"""
import pluggy

hookspec = pluggy.HookspecMarker("rlgen")
hookimpl = pluggy.HookimplMarker("rlgen")


@hookspec
def register_algorithms(register):
    """Training algorithms (`rlgen train NAME`): rlgen.algorithms.base.Algorithm objects."""


@hookspec
def register_rewards(register):
    """Rewards: rlgen.rewards.base.Reward objects, or factories taking keyword options."""


@hookspec
def register_advantage_estimators(register):
    """Advantage estimators: pure functions (rewards, group_index, ...) -> advantages."""


@hookspec
def register_policy_losses(register):
    """Per-token policy losses: pure functions of log-prob ratios and advantages."""


@hookspec
def register_preference_losses(register):
    """Pairwise preference losses (`algorithm.loss_type` of dpo, simpo, rpo, orpo, online-dpo): pure
    functions of sequence log-probs -> per-pair losses (rlgen.algorithms.preference_losses)."""


@hookspec
def register_reward_combiners(register):
    """Ways to combine several reward columns into one (weighted sum, min, ensemble mean - k*std ...):
    pure functions (components [N, R], weights [R], **options) -> [N]."""


@hookspec
def register_reward_shapings(register):
    """Transforms of the combined reward (PAR, reference-frozen normalisation ...): pure functions
    (values [N], reference [N] or None, **options) -> [N]."""


@hookspec
def register_backbones(register):
    """Model backbones: the object that resolves, loads and saves one model family (e.g. causal-lm)."""


@hookspec
def register_models(register):
    """Model names resolving to a local directory (`--model NAME`): register(name, Path)."""


@hookspec
def register_samplers(register):
    """Sampling strategies for `rlgen sample --sampler NAME`: functions (engine, prompts, params,
    generator=None, **options) -> Rollouts (rlgen.rollout.samplers)."""


@hookspec
def register_image_samplers(register):
    """Sampling / test-time search strategies for image models (`rlgen sample --sampler NAME` on a diffusers
    pipeline): functions (model, prompts, params, generator, *, records, rewards, stats, **options) -> samples."""


@hookspec
def register_mergers(register):
    """Weight-merge methods for `rlgen merge --method NAME`: rlgen.merging.methods.MergeMethod objects."""


@hookspec
def register_metrics(register):
    """Evaluation metrics for `rlgen eval --metric NAME`: callables (samples: list[dict], **options) ->
    dict[str, float | None] over scored samples (rlgen.evaluation.metric_contract, which adapts the
    built-in building blocks)."""


@hookspec
def register_trackers(register):
    """Experiment trackers (`run.report_to = ["NAME"]`): classes like rlgen.training.trackers.Tracker, called with
    their directory (OUT/tracking/NAME) and, where the constructor takes them, `config`, `run_name` and
    `start_step`; then `log(step, metrics)`, `log_table(step, name, rows)` and `close(failed=False)`. Their
    `packages` are imported only when the tracker is asked for. Rank 0 alone opens them."""


@hookspec
def register_tasks(register):
    """Datasets with verifiable answers: rlgen.data.tasks.Task objects."""


@hookspec
def register_commands(app):
    """Extra CLI subcommands: add them to the typer `app` (`app.command("NAME")(fn)`). They are listed in
    `rlgen --help` and `rlgen plugins`; a name that a built-in or an earlier plugin holds is dropped with
    a warning."""
