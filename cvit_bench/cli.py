"""Command line: ``cvit-bench run | eval | prepare | ls | validate | convert | chance | report | bench | check``."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cvit_bench.data.llava_format import DataError
from cvit_bench.ranges import SEED, range_problem
from cvit_bench.registry import ConfigError, UnknownNameError
from cvit_bench.suites.schema import SuiteError, load_suite, suite_names
from cvit_bench.training.loop import NonFiniteLossError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Benchmark harness for continual visual instruction tuning.")
console = Console()
USER_ERRORS = (SuiteError, DataError, UnknownNameError, ConfigError, NonFiniteLossError)


@app.callback()
def _quiet_libraries() -> None:
    """Our progress display is the only one: no per-load bars or deprecation notes from libraries."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers|peft")


def print_table(table: Table) -> None:
    """Off a terminal (CI logs, `> file`) a wide table keeps its natural width instead of being cut to a guessed 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(file=console.file, width=max(console.width, natural)).print(table)


def fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


class RichReporter:
    """Shows stage, task, step, loss and samples/s while a run trains and evaluates.

    Off a terminal (CI logs, `> file`) the live bar is invisible, so progress is also printed as
    one line every `LOG_EVERY` steps.
    """

    LOG_EVERY = 50

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task_id = progress.add_task("starting", total=None, info="")
        self.plain = not progress.console.is_terminal

    def stage(self, stage: int, tasks: tuple[str, ...], steps: int) -> None:
        description = f"stage {stage}: train {'+'.join(tasks)}"
        self.progress.update(self.task_id, description=description, total=steps, completed=0)
        if self.plain:
            self.message(f"{description} ({steps} steps)")

    def step(self, step: int, loss: float, samples_per_s: float) -> None:
        info = f"loss {loss:.3f}  {samples_per_s:.0f} samples/s"
        self.progress.update(self.task_id, completed=step, info=info)
        if self.plain and step % self.LOG_EVERY == 0:
            self.message(f"  step {step}  {info}")

    def evaluating(self, stage: int, name: str, done: int, total: int) -> None:
        self.progress.update(self.task_id, description=f"stage {stage}: evaluate {name}", total=None, info="")

    def message(self, text: str) -> None:
        self.progress.console.print(text)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True)


def _parse_options(options: list[str]) -> dict:
    overrides = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--option {item!r}: the value is not a YAML scalar ({str(error).splitlines()[0]})") from None
    return overrides


@app.command()
def run(
    suite: str = typer.Option("cvit-v2", help="suite name (see `cvit-bench ls`) or path to a suite YAML"),
    method: Optional[str] = typer.Option(None, help="method name (see `cvit-bench ls`), comma-separated names, or `all`"),
    seed: int = typer.Option(0, min=0, max=SEED.high, help="fixes data generation, initialisation and batch order"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (instead of --seed): one run per method and seed"),
    jobs: int = typer.Option(1, min=1, help="runs of a sweep (several methods or seeds) executed at once, as child processes"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads per run (default: all cores, divided by --jobs in a sweep)"),
    data_workers: int = typer.Option(0, min=0, help="DataLoader worker processes decoding images ahead of each batch (0: in the run's own process)"),
    results_dir: Path = typer.Option(Path("results"), help="results are written to DIR/<suite>/<method>/<run-id>/"),
    model: Optional[str] = typer.Option(None, help="local checkpoint dir or hub id (default: the suite's embedded tiny LLaVA)"),
    data_root: Optional[Path] = typer.Option(None, help="root of LLaVA-format data for real suites"),
    option: list[str] = typer.Option([], help="method config override KEY=VALUE (repeatable)"),
    steps_per_task: Optional[int] = typer.Option(None, min=1, help="override the suite's training.steps_per_task"),
    max_steps: Optional[int] = typer.Option(None, min=1, help="cap on every stage's optimizer steps (a budget for real models)"),
    epochs_per_task: Optional[float] = typer.Option(None, help="train each stage ceil(E x its samples / batch size) steps (the papers: 1) instead of steps_per_task"),
    dtype: str = typer.Option("float32", help="model weights dtype: float32, bfloat16 or float16 (adapters stay float32, as peft keeps them)"),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", "--mixed_precision", help="autocast forwards in bf16 or fp16 over the loaded weights (accelerate's flag; default: what `accelerate launch --mixed_precision` set, else no)"),
    batch_size: Optional[int] = typer.Option(None, help="samples per optimizer step over all processes (default: the suite's training.batch_size)"),
    grad_accum: int = typer.Option(1, min=1, help="split every optimizer step into this many forwards per process, same batch (default 1)"),
    save_adapters: bool = typer.Option(False, help="export each stage's trained weights to RUN_DIR/adapters/stage<K>/ (peft save_pretrained + safetensors); `cvit-bench eval RUN_DIR --stage K` re-evaluates them"),
    gradient_checkpointing: bool = typer.Option(False, help="recompute activations in backward (less memory, ~30% slower)"),
    log_with: str = typer.Option("none", help="loss curves: an accelerate tracker (tensorboard, wandb, ...; its package installed) logging each step's loss and lr per stage, TensorBoard's under RUN_DIR/tracking/; none: off"),
    module_pattern: list[str] = typer.Option([], help="override an adapted-module regex KEY=REGEX, KEY in llm_linears, llm_ffn, projector, vision"),
    order: Optional[str] = typer.Option(None, help="train the tasks in this order: a name from the suite's `orders:` or a comma-separated permutation of its tasks (default: as listed)"),
    only: Optional[str] = typer.Option(None, help="single-task reference runs: train this task alone from the base (comma-separated tasks or `all`: one run each; directory seed<N>-only-<task>)"),
    run_id: Optional[str] = typer.Option(None, help="run directory name (default seed<N>, seed<N>-order-<name> with --order)"),
    variant: Optional[str] = typer.Option(None, help="name this configuration of the method (with --option): its runs are a row of their own in <suite>-ablation-<method>, directory seed<N>-variant-<name>"),
    resume: Optional[Path] = typer.Option(None, help="continue the run in this directory with the options it was started with"),
    fresh: bool = typer.Option(False, help="discard the run directory's checkpoint and results and start over"),
    keep_checkpoint: bool = typer.Option(False, help="keep the last stage checkpoint (final weights) after the run finishes"),
) -> None:
    """Train METHOD through SUITE task by task, evaluating after every stage, and write results.

    Re-running the same command into the same run directory continues after the last finished stage.
    """
    from cvit_bench.distributed import current_processes, end_process_group, launch_mixed_precision
    from cvit_bench.io import read_json
    from cvit_bench.models.backend import parse_dtype, parse_module_patterns
    from cvit_bench.reporting.tables import run_summary_table
    from cvit_bench.runner import Reporter, RunOptions, run as run_suite
    from cvit_bench.suites.orders import resolve_order

    try:
        parse_dtype(dtype)
        if epochs_per_task is not None and steps_per_task is not None:
            raise ConfigError("run: --epochs-per-task replaces --steps-per-task (give one of them)")
        if resume is not None:
            options = RunOptions.from_run_dir(resume)
        elif method is None:
            raise ConfigError("run: pass --method (or --resume RUN_DIR)")
        else:
            methods, seed_list = _sweep_axes(method, seeds, seed)
            loaded = load_suite(suite)
            task_order = resolve_order(loaded, order)
            only_tasks = _only_tasks(loaded, only)
            if len(methods) * len(seed_list) * len(only_tasks or [None]) > 1:
                if run_id is not None:
                    raise ConfigError("run: --run-id names one run; a sweep writes seed<N> directories")
                from cvit_bench.sweep import plan_sweep

                extra = [arg for item in option for arg in ("--option", item)]
                extra += [*(["--steps-per-task", str(steps_per_task)] if steps_per_task is not None else []), *(["--model", model] if model else []),
                          *(["--max-steps", str(max_steps)] if max_steps is not None else []), "--dtype", dtype,
                          *(["--epochs-per-task", str(epochs_per_task)] if epochs_per_task is not None else []),
                          *(["--gradient-checkpointing"] if gradient_checkpointing else []),
                          *[arg for item in module_pattern for arg in ("--module-pattern", item)],
                          *(["--data-root", str(data_root)] if data_root else []), *(["--fresh"] if fresh else []),
                          *(["--keep-checkpoint"] if keep_checkpoint else []), *(["--save-adapters"] if save_adapters else []),
                          *(["--batch-size", str(batch_size)] if batch_size else []), *(["--grad-accum", str(grad_accum)] if grad_accum > 1 else []),
                          *(["--mixed-precision", mixed_precision] if mixed_precision else []), "--data-workers", str(data_workers),
                          "--log-with", log_with]
                _sweep(loaded, seed_list, jobs, threads, "--model" in extra,
                       lambda n: plan_sweep(suite, loaded.name, methods, seed_list, results_dir, n, extra, task_order, only_tasks, variant),
                       f"{len(methods)} methods x seeds {seed_list}" + (f", order {task_order.name}" if task_order else ""), fresh)
                return
            options = RunOptions(loaded, methods[0], seed_list[0], results_dir, model, data_root, _parse_options(option),
                                 steps_per_task, run_id, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                                 max_steps=max_steps, module_patterns=parse_module_patterns(module_pattern), epochs_per_task=epochs_per_task,
                                 order=task_order, only=only_tasks[0] if only_tasks else None, batch_size=batch_size,
                                 grad_accum=grad_accum, mixed_precision=mixed_precision or launch_mixed_precision(),
                                 save_adapters=save_adapters, log_with=log_with, variant=variant)
        if threads is not None:
            options = dataclasses.replace(options, threads=threads)
        options = dataclasses.replace(options, data_workers=data_workers)
        if not current_processes().is_main:  # under accelerate launch only the main process reports and writes
            run_suite(options, Reporter(), fresh=fresh, keep_checkpoint=keep_checkpoint)
            end_process_group()
            return
        with _progress() as progress:
            run_dir = run_suite(options, RichReporter(progress), fresh=fresh, keep_checkpoint=keep_checkpoint)
        end_process_group()
    except (*USER_ERRORS, OSError) as error:  # OSError: disk full, permissions; the message names the file
        fail(error)
    result = read_json(run_dir / "results.json")
    console.print(run_summary_table(result))
    console.print(f"results: {run_dir / 'results.json'}  ({result['timings']['total_s']:.0f} s)")


def resolution_line(board) -> str:
    """What AP difference the leaderboard's seeds resolve (80 % power, two-sided 5 %), and how many method pairs it separates."""
    from cvit_bench.reporting.power import detectable_difference, separated_pairs

    detectable = detectable_difference(board, "AP")
    if detectable is None:
        return "resolution: fewer than two seeds per method, so no seed spread to test differences against"
    difference, n_seeds = detectable
    means = dict(zip(board["method"], board["AP_mean"]))
    pairs = len(means) * (len(means) - 1) // 2
    return (f"resolution: with {n_seeds} seeds an AP difference of {difference:.1f} points is detected with 80 % power; "
            f"{len(separated_pairs(means, difference))} of {pairs} method pairs differ by at least that much")


def _only_tasks(loaded, only: str | None) -> list[str] | None:
    """The training tasks of ``--only`` (each checked against the suite), or None without it."""
    from cvit_bench.suites.orders import single_task

    if only is None:
        return None
    tasks = loaded.task_names if only == "all" else [name.strip() for name in only.split(",") if name.strip()]
    for task in tasks:
        single_task(loaded, task)
    return tasks or None


def _sweep_axes(method: str, seeds: str | None, seed: int) -> tuple[list[str], list[int]]:
    from cvit_bench.methods import METHODS

    methods = list(METHODS.names()) if method == "all" else list(dict.fromkeys(n.strip() for n in method.split(",") if n.strip()))
    if not methods:
        raise ConfigError(f"--method {method!r}: name at least one method")
    for name in methods:
        METHODS.get(name)  # unknown names fail before anything starts
    return methods, [seed] if seeds is None else _parse_seeds(seeds)


def _parse_seeds(seeds: str) -> list[int]:
    try:
        parsed = list(dict.fromkeys(int(value) for value in seeds.split(",")))  # a repeated seed would race for one run dir
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2") from None
    problems = [problem for seed in parsed if (problem := range_problem("--seeds", seed, SEED, integer=True))]
    if problems:
        raise ConfigError(problems[0])
    return parsed


def _sweep(loaded, seeds: list[int], jobs: int, threads: int | None, own_model: bool, plan: Callable[[int], list], what: str,
           fresh: bool = False) -> None:
    """The children ``plan(threads)`` lists, ``jobs`` at a time; failures are listed with their logs and make the exit code 1."""
    from cvit_bench.models.base_checkpoint import prepare_base
    from cvit_bench.suites.materialize import materialize
    from cvit_bench.sweep import default_threads, run_sweep

    if loaded.data_source != "llava":  # generate each seed's data and the shared base once, not in every child at once
        with _progress() as progress:
            reporter = RichReporter(progress)
            progress.update(reporter.task_id, description="data and base checkpoint")
            for seed in seeds:
                materialize(loaded, seed)
            if not own_model:
                prepare_base(loaded, report=reporter.step)
    threads = default_threads(jobs) if threads is None else threads
    runs = plan(threads)
    console.print(f"sweep: {len(runs)} runs of {loaded.name} ({what}), {jobs} at a time, {threads} threads each")

    def done(outcome, finished: int, total: int) -> None:
        state = "[green]ok[/]" if outcome.returncode == 0 else f"[red]failed (exit {outcome.returncode})[/], see {outcome.log}"
        console.print(f"[{finished}/{total}] {outcome.run.method} seed {outcome.run.seed}: {state} ({outcome.seconds:.0f} s)", highlight=False)

    failed = [o for o in run_sweep(runs, jobs, threads, done) if o.returncode != 0]
    if failed:
        retry = ("re-run it without --fresh to retry them (finished runs are then skipped)" if fresh
                 else "re-run the same command to retry them (finished runs are skipped, interrupted ones resume)")
        console.print(f"[bold red]{len(failed)} of {len(runs)} runs failed[/]; {retry}")
        raise typer.Exit(code=1)


@app.command()
def ablate(
    method: str = typer.Argument(..., help="a method whose paper's ablation ladder it declares (see `cvit-bench ls`)"),
    suite: str = typer.Option("cvit-v2", help="suite name or path to a suite YAML"),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds: every rung runs each"),
    jobs: int = typer.Option(1, min=1, help="runs executed at once, as child processes"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads per run (default: all cores, divided by --jobs)"),
    results_dir: Path = typer.Option(Path("results"), help="rung runs are written to DIR/<suite>/<method>/seed<N>-variant-<rung>/"),
    steps_per_task: Optional[int] = typer.Option(None, min=1, help="override the suite's training.steps_per_task"),
    order: Optional[str] = typer.Option(None, help="a task order from the suite's `orders:` or a permutation (default: as listed)"),
) -> None:
    """Run every rung of METHOD's ablation ladder (bottom first) for every seed, then print the rungs beside the paper's scores.

    Each rung is a named variant (`run --variant`), so `report` gives it a row of its own in
    `<suite>-ablation-<method>.csv`; re-running the command resumes or skips finished rungs.
    """
    from cvit_bench.methods import METHODS
    from cvit_bench.reporting.leaderboard import build_leaderboard, find_results, leaderboard_groups, with_paper_scores
    from cvit_bench.reporting.tables import leaderboard_table
    from cvit_bench.suites.orders import resolve_order
    from cvit_bench.sweep import plan_ablation

    try:
        ladder = METHODS.get(method).ablation_ladder
        if not ladder:
            laddered = [name for name in METHODS.names() if METHODS.get(name).ablation_ladder]
            raise ConfigError(f"ablate: {method} declares no ablation ladder (methods with one: {', '.join(laddered)})")
        loaded = load_suite(suite)
        task_order = resolve_order(loaded, order)
        seed_list = _parse_seeds(seeds)
        extra = ["--dtype", "float32", *(["--steps-per-task", str(steps_per_task)] if steps_per_task is not None else [])]
        _sweep(loaded, seed_list, jobs, threads, False,
               lambda n: plan_ablation(suite, loaded.name, method, ladder, seed_list, results_dir, n, extra, task_order),
               f"{len(ladder)} rungs of {method} x seeds {seed_list}")
        name = f"{loaded.name}{f'-order-{task_order.name}' if task_order else ''}-ablation-{method}"
        board = with_paper_scores(build_leaderboard(leaderboard_groups(find_results(results_dir, loaded.name))[name]))
    except (*USER_ERRORS, ValueError, OSError) as error:
        fail(error)
    print_table(leaderboard_table(board, title=f"Ablation ladder: {name}"))
    console.print("paper: " + ", ".join(f"{label.partition(':')[2]} {score:.2f}" for label, score in zip(board["method"], board["paper"])))


@app.command(name="eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory started with --save-adapters"),
    stage: int = typer.Option(..., help="the stage whose exported weights to evaluate (1 = after the first trained stage)"),
) -> None:
    """Evaluate one stage of a finished or interrupted run again from its exported weights; prints its row and writes RUN_DIR/eval-stage<K>.json."""
    from cvit_bench.runner import reevaluate_stage

    try:
        with _progress() as progress:
            report = reevaluate_stage(run_dir, stage, RichReporter(progress))
    except (*USER_ERRORS, OSError) as error:
        fail(error)
    table = Table("group", "set", "VU", "IF", "strict", "recorded VU", title=f"{run_dir}: stage {stage} (rows {report['rows']})")
    for row in report["sets"]:
        recorded = row.get("recorded", {}).get("vu")
        table.add_row(row["group"], row["set"], f"{row['vu']:.2f}", f"{row['if']:.2f}", f"{row['strict']:.2f}",
                      "-" if recorded is None else f"{recorded:.2f}")
    print_table(table)
    console.print(f"wrote {Path(run_dir) / f'eval-stage{stage}.json'}")


@app.command()
def prepare(
    suite: str = typer.Option("cvit-v2", help="suite whose base checkpoint to find or build"),
    rebuild: bool = typer.Option(False, "--rebuild", help="build the base from scratch even when the suite ships one, and say whether the rebuild is bit-identical to it"),
    ship_it: bool = typer.Option(False, "--ship", help="with --rebuild: copy the rebuilt base into the suite's shipped folder (maintainers; commit it)"),
) -> None:
    """Find the suite's base checkpoint (the shipped one, or the cached build), or build it; the same for the tiny CLIP
    the suite names (``model.clip``), which hide and modalprompt read."""
    from cvit_bench.models.base_checkpoint import compare_with_shipped, prepare_base, ship
    from cvit_bench.models.clip_towers import clip_source, compare_with_shipped_clip, prepare_clip, ship_clip
    from cvit_bench.suites.schema import ClipRecipe

    if ship_it and not rebuild:
        fail(ConfigError("--ship needs --rebuild: only a base built from scratch here is shipped"))
    try:
        loaded = load_suite(suite)
        with _progress() as progress:
            reporter = RichReporter(progress)
            progress.update(reporter.task_id, description="base stage (generic pretraining)")
            directory, digest = prepare_base(loaded, report=reporter.step, rebuild=rebuild)
        if rebuild:
            console.print(compare_with_shipped(loaded, directory))
        if ship_it:
            directory = ship(loaded, directory, digest)
        console.print(f"base checkpoint {digest}: {directory}")
        if isinstance(clip_source(loaded), ClipRecipe) and "clip" in loaded.model:  # a named checkpoint is not built here
            with _progress() as progress:
                reporter = RichReporter(progress)
                progress.update(reporter.task_id, description="tiny CLIP (contrastive text side)")
                clip_dir, clip_digest = prepare_clip(loaded, directory, digest, report=reporter.step, rebuild=rebuild)
            if rebuild:
                console.print(compare_with_shipped_clip(loaded, clip_dir))
            if ship_it:
                clip_dir = ship_clip(loaded, clip_dir, clip_digest, directory)
            console.print(f"CLIP {clip_digest}: {clip_dir}")
    except (*USER_ERRORS, OSError) as error:
        fail(error)


@app.command(name="ls")
def list_things() -> None:
    """List suites, methods (with their config fields) and scorers."""
    from cvit_bench.evaluation.contracts import CONTRACTS
    from cvit_bench.evaluation.scoring import CORPUS_SCORERS, SAMPLE_SCORERS
    from cvit_bench.methods import METHODS

    suites = Table("suite", "tasks", "unseen", "description", title="suites")
    for name in suite_names():
        try:
            loaded = load_suite(name)
            suites.add_row(name, " → ".join(loaded.task_names), ", ".join(t.name for t in loaded.unseen), loaded.description)
        except SuiteError as error:
            suites.add_row(name, "[red]invalid[/]", "", str(error.problems[0]))
    console.print(suites)
    methods = Table("method", "option", "default", "allowed", "help", title="methods")
    for name in METHODS.names():
        cls = METHODS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        methods.add_row(f"[bold]{name}[/]", "", "", "", doc)
        for field_name, default, allowed, help_text in cls.describe_config():
            methods.add_row("", field_name, default, allowed, help_text)
    console.print(methods)
    console.print("scorers: " + ", ".join([*SAMPLE_SCORERS, *CORPUS_SCORERS]))
    console.print("format contracts: " + ", ".join(CONTRACTS))


@app.command()
def validate(
    suite: str = typer.Argument(..., help="suite name or path to a suite YAML"),
    data_root: Optional[Path] = typer.Option(None, help="for real suites: check that every file the suite reads is there (default $CVIT_DATA_ROOT)"),
) -> None:
    """Check a suite and its instruction templates; for real suites also the data files. Reports every problem with file and field."""
    from cvit_bench.suites.availability import check_data, format_report
    from cvit_bench.suites.materialize import check_records, materialize, resolve_data_root
    from cvit_bench.suites.schema import RealSuite, heldout_repeats

    try:
        loaded = load_suite(suite)
        repeats = heldout_repeats(loaded)
        if repeats:
            raise SuiteError(repeats)
    except SuiteError as error:
        console.print(f"[bold red]{len(error.problems)} problem(s):[/]")
        for problem in error.problems:
            console.print(f"  {problem}", highlight=False)
        raise typer.Exit(code=1)
    console.print(f"[green]ok[/]: {loaded.name} ({loaded.path}): {len(loaded.tasks)} tasks, {len(loaded.unseen)} unseen")
    if not isinstance(loaded, RealSuite):
        return
    for item in loaded.not_computed:
        console.print(f"  [yellow]{item.describe()}[/]", highlight=False)
    root = resolve_data_root(data_root)
    if root is None:
        console.print("  data not checked: pass --data-root or set CVIT_DATA_ROOT")
        return
    missing = check_data(loaded, root)
    console.print(format_report(loaded, root, missing), highlight=False, soft_wrap=True)
    if missing:
        raise typer.Exit(code=1)
    problems = check_records(loaded, materialize(loaded, 0, root))  # what a run checks before it starts
    for problem in problems:
        console.print(f"  {problem}", highlight=False, soft_wrap=True)
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s) in the records and images[/]")
        raise typer.Exit(code=1)
    console.print("  every record reads and every image opens")


@app.command()
def convert(
    suite: str = typer.Argument(..., help="real suite whose released files to convert: coin, smolora-cvit, ucit (or a suite YAML)"),
    src: Path = typer.Argument(..., help="the release as downloaded: each task's folder (as the suite's `data:` names it) and the image folder"),
    dst: Path = typer.Argument(..., help="where the converted files go; pass it as --data-root to validate and run"),
) -> None:
    """Rewrite released annotation and question files as the harness's records (instruction cut from the question; answers, options, boxes kept)."""
    from cvit_bench.data.convert import convert_suite
    from cvit_bench.suites.schema import RealSuite

    try:
        loaded = load_suite(suite)
        if not isinstance(loaded, RealSuite):
            raise ConfigError(f"convert: {loaded.name} is a synthetic suite; convert reads the releases of real (llava) suites")
        reports = convert_suite(loaded, src, dst)
    except (*USER_ERRORS, OSError) as error:
        fail(error)
    for item in reports:
        console.print(("[yellow]" if item.unframed else "") + item.describe(), highlight=False, soft_wrap=True)
    console.print(f"[green]converted[/] {sum(r.records for r in reports)} records; check them with "
                  f"`cvit-bench validate {suite} --data-root {dst}`", highlight=False)


@app.command()
def chance(
    suite: str = typer.Option("cvit-v2", help="suite name or path to a suite YAML"),
    seeds: str = typer.Option("0,1,2", help="data seeds; chance and ceilings are the maximum over them"),
) -> None:
    """Measure each task's image-blind chance (the best constant reply's test score) and CIDEr ceiling; exit 1 where the
    suite declares other values."""
    from cvit_bench.evaluation.chance import measure_chance

    try:
        loaded = load_suite(suite)
        with console.status(f"scoring constant replies on {loaded.name}"):
            rows = measure_chance(loaded, _parse_seeds(seeds))
    except (*USER_ERRORS, OSError) as error:
        fail(error)
    table = Table("task", "scorer", "chance", "declared", "best constant reply", "ceiling", "declared", "",
                  title=f"chance of {loaded.name} (seeds {seeds})")
    for row in rows:
        problems = row.mismatches()
        table.add_row(row.task, row.scorer, f"{row.chance:.1f}", _declared(row.declared_chance), repr(row.best_reply)[:40],
                      "-" if row.ceiling is None else f"{row.ceiling:.1f}", _declared(row.declared_ceiling),
                      "[red]" + "; ".join(problems) + "[/]" if problems else "[green]ok[/]")
    print_table(table)
    if any(row.mismatches() for row in rows):
        console.print(f"[bold red]declared values differ[/]: set them in {loaded.path}")
        raise typer.Exit(code=1)


def _declared(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


@app.command()
def report(
    results_dir: Path = typer.Option(Path("results"), help="where run directories are"),
    out_dir: Path = typer.Option(Path("leaderboards"), help="where leaderboard CSVs and heatmaps go"),
    heatmaps: bool = typer.Option(True, help="write heatmap PNGs of each run's matrices next to its results.json"),
    html: bool = typer.Option(True, help="write a self-contained HTML page per leaderboard and index.html into --out-dir"),
) -> None:
    """Rebuild leaderboard CSVs (one per suite and task order) and each suite's rank agreement from all results, print them,
    draw heatmaps and write the HTML pages."""
    from cvit_bench.reporting.heatmaps import plot_run_heatmaps
    from cvit_bench.reporting.html import write_pages
    from cvit_bench.reporting.leaderboard import build_leaderboard, find_results, leaderboard_groups, rebuild_leaderboards
    from cvit_bench.reporting.rank_agreement import rebuild_rank_agreement
    from cvit_bench.reporting.tables import leaderboard_table, rank_agreement_table

    try:
        written = rebuild_leaderboards(results_dir, out_dir)
        all_results = find_results(results_dir)
        groups = leaderboard_groups(all_results)
        for name, path in sorted(written.items()):
            results = groups.get(name)
            if results is None:  # a per-task or single-task reference table
                console.print(f"wrote {path}")
                continue
            board = build_leaderboard(results)
            print_table(leaderboard_table(board, title=f"Leaderboard: {name}"))
            console.print(f"wrote {path}")
            console.print(resolution_line(board))
            if heatmaps:
                for result in results:
                    plot_run_heatmaps(result, Path(result["results_path"]).parent)
        agreement = rebuild_rank_agreement(all_results, out_dir)
        for suite_name, (path, table) in agreement.items():
            print_table(rank_agreement_table(table, title=f"Rank agreement: {suite_name}"))
            console.print(f"wrote {path}")
        if html:
            pages = write_pages(all_results, out_dir, {suite_name: table for suite_name, (_, table) in agreement.items()})
            console.print(f"wrote {len(pages) - 1} leaderboard pages and {pages['index']}")
    except (*USER_ERRORS, ValueError, OSError) as error:  # ValueError: refusals, malformed results; OSError: an unwritable --out-dir
        fail(error)


@app.command()
def bench(
    suite: str = typer.Option("cvit-v2", help="suite whose base model, first task and batch size are used"),
    method: list[str] = typer.Option([], help="methods to measure (repeatable; default: every registered method)"),
    steps: int = typer.Option(20, min=1, help="timed training steps per method (after the warm-up)"),
    warmup: int = typer.Option(3, min=0, help="untimed warm-up steps per method"),
    eval_samples: int = typer.Option(64, min=1, help="samples generated for the evaluation throughput"),
    out: Path = typer.Option(Path("bench.json"), help="where the JSON report goes"),
) -> None:
    """Train-step time of every method relative to seqlora on the same batches, its FLOPs and MFU, eval throughput and peak memory."""
    import torch

    from cvit_bench.benchmark import REFERENCE_METHOD, matmul_peak_gflops, rows_to_json, run_benchmark
    from cvit_bench.io import atomic_write_json
    from cvit_bench.methods import METHODS

    try:
        loaded = load_suite(suite)
        names = method or list(METHODS.names())
        for name in names:
            METHODS.get(name)
        with console.status("benchmarking") as status:
            status.update("measuring the fp32 matmul peak")
            peak = matmul_peak_gflops()
            rows = run_benchmark(loaded, names, peak_gflops=peak, steps=steps, warmup=warmup, eval_samples=eval_samples,
                                 report=lambda name: status.update(f"benchmarking {name}"))
    except (*USER_ERRORS, OSError) as error:
        fail(error)
    table = Table(title=f"cvit-bench bench: {loaded.name}, batch {loaded.training.batch_size}, {steps} timed steps")
    for header in ("method", "step ms", f"x {REFERENCE_METHOD}", "GFLOP/step", "MFU %", "eval samples/s", "eval tokens/s", "peak MB", "trainable"):
        table.add_column(header, no_wrap=True)
    for row in rows:
        trains = row.step_ms is not None
        table.add_row(row.method, f"{row.step_ms:.0f}" if trains else "-", f"{row.relative_step:.2f}" if trains else "-",
                      f"{row.gflop_per_step:.2f}" if trains else "-", f"{row.mfu_percent:.1f}" if trains else "-", f"{row.eval_samples_per_s:.1f}",
                      f"{row.eval_tokens_per_s:.0f}", f"{row.peak_memory_mb:.0f}", f"{row.trainable_params:,}")
    print_table(table)
    console.print(f"fp32 matmul peak: {peak:.1f} GFLOP/s (best of 2048 x 2048 products, {torch.get_num_threads()} threads)")
    try:
        atomic_write_json(out, rows_to_json(rows, loaded, steps, warmup, peak))
    except OSError as error:  # an unwritable --out; the message names the file
        fail(error)
    console.print(f"wrote {out}")


@app.command()
def check(
    suite: str = typer.Option("cvit-v2-check", help="suite to re-run; its bands are read from checks/<suite>.yaml"),
    method: list[str] = typer.Option([], help="methods to check (repeatable; default: all in the bands file); with --record, the methods to record"),
    record: bool = typer.Option(False, help="run the methods with --seeds and rewrite their bands instead of checking (other methods' bands are kept)"),
    seeds: str = typer.Option("0,1,2", help="seeds whose spread defines the bands (with --record; the first becomes the check seed)"),
    k: float = typer.Option(3.0, min=0.0, help="band half-width in sample standard deviations (with --record)"),
    results_dir: Optional[Path] = typer.Option(None, help="keep the runs here (default: a temporary directory; an existing one is resumed)"),
    order: Optional[str] = typer.Option(None, help="train the tasks in this order (as `run --order`); its bands are checks/<suite>-order-<name>.yaml"),
) -> None:
    """CI regression check: re-run a fixed set of methods and seeds; fail with a table of every metric outside its band."""
    import tempfile

    from cvit_bench.io import read_json
    from cvit_bench.regression import bands_path, compare, derive_bands, kept_bands, load_bands, write_bands
    from cvit_bench.runner import RunOptions, run as run_suite
    from cvit_bench.suites.orders import resolve_order

    try:
        loaded = load_suite(suite)
        task_order = resolve_order(loaded, order)
        path = bands_path(loaded.name, task_order)
        if record:
            if not method:
                raise ConfigError("check --record: name the methods to record with --method")
            seed_list = _parse_seeds(seeds)
            if len(seed_list) < 2:
                raise ConfigError(f"check --record: bands come from the seed spread, so pass at least two seeds (got --seeds {seeds})")
            plan = {name: seed_list for name in _sweep_axes(",".join(method), None, 0)[0]}
            kept = kept_bands(path, list(plan), seed_list, k)
        else:
            bands = load_bands(path)
            unknown = sorted(set(method) - set(bands.bands))
            if unknown:
                raise ConfigError(f"{path}: no bands for {unknown} (recorded: {sorted(bands.bands)})")
            plan = {name: list(bands.check_seeds) for name in (method or sorted(bands.bands))}
        with tempfile.TemporaryDirectory(prefix="cvit-check-") as scratch:
            directory = results_dir or Path(scratch)
            results: dict[str, list[dict]] = {}
            with _progress() as progress:
                reporter = RichReporter(progress)
                for name, name_seeds in plan.items():
                    for seed in name_seeds:
                        reporter.message(f"{name} seed {seed}")
                        run_dir = run_suite(RunOptions(loaded, name, seed, directory, order=task_order), reporter)
                        results.setdefault(name, []).append(read_json(run_dir / "results.json"))
    except (*USER_ERRORS, OSError) as error:
        fail(error)
    if record:
        write_bands(path, loaded.name, seed_list, seed_list[:1], k, kept | derive_bands(results, k), task_order)
        console.print(f"wrote {path}")
        return
    violations = compare(results, bands)
    checked = sum(len(bands.bands[name]) * len(runs) for name, runs in results.items())
    if not violations:
        console.print(f"[green]ok[/]: {checked} values of {len(results)} methods within their bands ({path})")
        return
    table = Table("method", "seed", "metric", "value", "band", title=f"{len(violations)} of {checked} values outside their bands ({path})")
    for v in violations:
        value = "missing" if v.value is None else f"{v.value:.4g}"
        table.add_row(v.method, str(v.seed), v.metric, f"[red]{value}[/]", f"[{v.band.low:.4g}, {v.band.high:.4g}]")
    console.print(table)
    raise typer.Exit(code=1)
