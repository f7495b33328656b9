"""The ``isoprobe`` command line: a click group; each command parses options and calls one function."""

from __future__ import annotations

import contextlib
import shlex
import sys
from typing import TYPE_CHECKING

import click

from isoprobe import __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from isoprobe.jobs import TextJob


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isoprobe")
def main() -> None:
    """Measure how deep networks keep or lose the geometry of their inputs.

    \b
    Examples:
      isoprobe beta relu tanh --gain 1 --gain 2
      isoprobe gpt2 --init random --text "The quick brown fox jumps over the lazy dog."
      isoprobe repro fig3 --quick --out results/
    """


# Each command is registered below by its own section; keep sections independent.


# --- shared by the commands that write an --out folder ------------------------------------------


class FolderInUse(click.ClickException):
    """Another run holds the ``--out`` folder: exit status 2, as for a usage error."""

    exit_code = 2


def _command_line() -> str:
    """This process's command, as the user would type it again."""
    return shlex.join(["isoprobe", *sys.argv[1:]])


def _resume_hint(out_dir: str) -> str:
    return (
        f"what finished is kept in {out_dir} (finished reproductions, the rows of finished units, "
        f"training checkpoints); run the same command again to resume where it stopped:\n  {_command_line()}"
    )


def _interrupted(kept: str) -> click.exceptions.Exit:
    """Ctrl-C: say what is kept and how to go on (the same command), exit status 130."""
    click.echo(f"\ninterrupted: {kept}", err=True)
    return click.exceptions.Exit(130)


# --- repro: paper reproductions, one command each (isoprobe.experiments) -----------------------


def _repro_list() -> str:
    from isoprobe.experiments import REGISTRY

    by_paper: dict[str, list] = {}
    for rep in REGISTRY.values():  # papers in order of first registration, each listed once
        by_paper.setdefault(rep.paper, []).append(rep)
    width = max(len(r.name) for r in REGISTRY.values())
    fig_width = max(len(r.figure) for r in REGISTRY.values())
    blocks = [
        "\n".join([paper] + [f"  {r.name:<{width}}  {r.figure:<{fig_width}}  {r.claim}" for r in reps])
        for paper, reps in by_paper.items()
    ]
    return "\n\n".join(blocks)


@main.command("repro")
@click.argument("names", nargs=-1)
@click.option("--list", "show_list", is_flag=True, help="List the reproductions: name, figure, claim, by paper.")
@click.option("--quick", is_flag=True, help="Smaller sizes and fewer runs; the claims stay decidable.")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=None,
    help="Independent runs per series (default: the paper's, usually 10; fewer with --quick).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights and inputs.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="results",
    show_default=True,
    help="Output directory; a partly filled one is resumed, finished reproductions are skipped.",
)
@click.option(
    "--data",
    default="auto",
    show_default=True,
    help="Image data for fig2/figC4 and the like: auto (the paper's data set, else a substitute, "
    "labelled as such), synthetic, digits, mnist, fashion_mnist, cifar10, cifar100, or a path.",
)
@click.option(
    "--protocol",
    type=click.Choice(["isoprobe", "paper"]),
    default="isoprobe",
    show_default=True,
    help="paper: Joudaki et al.'s notebook protocol (inputs, aggregation, sizes), written as "
    "NAME.paper.*; with `all`, only the reproductions that have it run.",
)
@click.option("--model", default=None, help="figC5: a pretrained model (gpt2, a Hub id or a local path).")
@click.option(
    "--text-file",
    "text_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="figC5: a file of texts, separated by blank lines.",
)
@click.option(
    "--quiet",
    "--no-progress",
    "no_progress",
    is_flag=True,
    help="No progress bars on stderr (they are off anyway when stderr is not a terminal).",
)
def repro_command(
    names: tuple[str, ...],
    show_list: bool,
    quick: bool,
    runs: int | None,
    seed: int,
    device: str,
    out_dir: str,
    data: str,
    protocol: str,
    model: str | None,
    text_file: str | None,
    no_progress: bool,
) -> None:
    """Reproduce figures and tables of the papers: NAME... or all.

    Each reproduction writes OUT/STEM.csv (tidy data), OUT/STEM.png (the figure) and
    OUT/STEM.json (claim, verdict: held / not held / undecided, the rule deciding it,
    measured, theory, config, data used), STEM = NAME (NAME.paper with --protocol paper).
    Under torchrun (`torchrun --nproc_per_node=N -m isoprobe repro ...`) the work is
    shared over the ranks and rank 0 writes.

    \b
    Examples:
      isoprobe repro --list
      isoprobe repro fig3 fig4 --quick --out results/
      isoprobe repro all --quick --data synthetic
      isoprobe repro fig4 --protocol paper --quick
    """
    from isoprobe import distributed, experiments
    from isoprobe.data import DataUnavailable
    from isoprobe.outlock import FolderBusy as FolderInUseError

    if show_list:
        click.echo(_repro_list())
        return
    options = experiments.Options(
        quick=quick, runs=runs, seed=seed, device=device, data=data, protocol=protocol, model=model, text_file=text_file
    )
    try:
        with distributed.torchrun_group() as (rank, _world):
            summaries = experiments.run_reproductions(
                names,
                options,
                out_dir,
                show_progress=not no_progress and sys.stderr.isatty(),
                echo=lambda msg: click.echo(msg, err=True),
                command=_command_line(),
            )
    except KeyboardInterrupt:
        raise _interrupted(_resume_hint(out_dir)) from None
    except FolderInUseError as exc:
        raise FolderInUse(str(exc)) from None
    except experiments.ReproductionOptionError as exc:  # bad name or option: checked before running
        raise click.UsageError(str(exc)) from exc
    except DataUnavailable as exc:  # --data NAME that cannot be had here
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # --out not writable
        raise click.ClickException(f"cannot write {exc.filename or out_dir}: {exc.strerror or exc}") from None
    if rank == 0:
        click.echo(experiments.summarize(summaries, out_dir))


# --- beta: Hermite statistics and isometry strength β of activations (Joudaki et al. 2023, Def. 3)


@main.command("beta")
@click.argument("activations", nargs=-1)
@click.option(
    "--gain", "gains", type=float, multiple=True, help="Pre-activation gain α: σ(α x) (repeatable; default 1)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--list", "show_list", is_flag=True, help="Show the registry: name, formula, kinks, whether β has a closed form."
)
def beta_command(activations: tuple[str, ...], gains: tuple[float, ...], as_json: bool, show_list: bool) -> None:
    """Isometry strength β = 2 − c1²/σ̄(1) of activations, by exact quadrature.

    For each ACTIVATION (a registry name) and gain: c0 = E σ(αz), c1 = E[z σ(αz)],
    σ̄(1) = Var σ(αz), β (Joudaki et al. 2023, Definition 3) and β's closed form where one
    exists (Table 2, Table C.1).

    \b
    Examples:
      isoprobe beta relu tanh sin --gain 1 --gain 2
      isoprobe beta exp --gain 0.5 --json
      isoprobe beta --list
    """
    from isoprobe import activations as registry
    from isoprobe import hermite

    if show_list:
        click.echo(registry.registry_report(as_json))
        return
    if not activations:
        raise click.UsageError(
            "name at least one activation, e.g. `isoprobe beta relu tanh --gain 1 --gain 2` "
            "(`isoprobe beta --list` shows them all)"
        )
    try:
        for name in activations:  # unknown names fail before any work
            registry.get_activation(name)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    rows, failed = [], []
    for name in activations:
        for gain in gains or (1.0,):
            try:
                rows += hermite.beta_table([name], [gain])
            except ValueError as error:
                failed.append(f"{name} at gain {hermite.gain_text(gain)}: {error}")
    if rows:
        click.echo(hermite.format_beta_rows(rows, as_json))
    if failed:
        done = f" (the {len(rows)} other row{'s' * (len(rows) != 1)} above are fine)" if rows else ""
        raise click.UsageError("; ".join(failed) + done)


# --- gpt2 and inspect: isometry of a transformer's tokens at every norm and activation --------


# Options shared by ``gpt2`` and ``inspect`` (the fields of isoprobe.jobs.TextJob), in --help order.
_TEXT_PROBE_OPTIONS = (
    click.option("--text", "texts", multiple=True, help="A text to probe (repeatable)."),
    click.option(
        "--text-file",
        "text_files",
        multiple=True,
        type=click.Path(dir_okay=False),
        help="A file of texts, separated by blank lines (repeatable).",
    ),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
    click.option(
        "--dtype",
        type=click.Choice(["float32", "float16", "bfloat16"]),
        default="float32",
        show_default=True,
        help="The model's dtype.",
    ),
    click.option(
        "--sites",
        default=None,
        help="Comma-separated: norm, activation, or globs on module names "
        "(e.g. 'transformer.h.*.ln_*'), or with a ':' on functional sites (e.g. '*:gelu'). Default: all.",
    ),
    click.option(
        "--calls/--no-calls",
        default=True,
        show_default=True,
        help="Also record activations and norms that a forward calls as functions (F.gelu, "
        "torch.tanh, x.relu_(), F.layer_norm...) as sites named 'module:function@index'; "
        "--no-calls: module sites only.",
    ),
    click.option(
        "--out",
        type=click.Path(file_okay=False),
        default=None,
        help="Write table.txt, records.csv, records.json and plot.png to this folder.",
    ),
    click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json", "csv"]),
        default="table",
        show_default=True,
        help="What to print.",
    ),
    click.option(
        "--plot", type=click.Path(dir_okay=False), default=None, help="Save the gap-along-depth plot (PNG) here."
    ),
    click.option(
        "--train-mode", is_flag=True, help="Run with dropout on, as the paper's notebook did (default: eval mode)."
    ),
    click.option(
        "--stride",
        type=int,
        default=None,
        help="Probe texts longer than the context in windows starting every STRIDE "
        "tokens (default: truncate, with a warning).",
    ),
    click.option(
        "--window",
        type=click.IntRange(min=2),
        default=None,
        help="Token Grams over consecutive windows of at most WINDOW tokens (each sequence cut into "
        "equal windows; default: one Gram per sequence). Use it when texts have more tokens than a "
        "site's width, which makes its Grams singular by construction.",
    ),
    click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
    click.option(
        "--gram-dtype",
        type=click.Choice(["float64", "float32"]),
        default="float64",
        show_default=True,
        help="Gram dtype (float32: cheaper, half the Gram products' cost; each record then "
        "states gap_error, an estimate of its gap's error, and item groups near collapse are "
        "measured again in float64).",
    ),
    click.option(
        "--quiet", is_flag=True, help="No progress bar on stderr (it is off anyway when stderr is not a terminal)."
    ),
)


def _text_probe_options(command):
    """Add :data:`_TEXT_PROBE_OPTIONS` to ``command``."""
    for option in reversed(_TEXT_PROBE_OPTIONS):
        command = option(command)
    return command


def _run_text_probe(family: str, **options) -> None:
    """Run the job, holding its ``--out`` folder; print the table even when writing fails afterwards."""
    from isoprobe import jobs, outlock

    def notify(message: str) -> None:
        click.echo(message, err=True)

    job = jobs.TextJob(family=family, **options)
    try:
        with outlock.hold_folder(job.out, _command_line(), notify) if job.out else contextlib.nullcontext():
            _probe_and_write(job, notify)
    except outlock.FolderBusy as error:
        raise FolderInUse(str(error)) from None
    except KeyboardInterrupt:
        raise _interrupted("the run did not finish (its files are written at the end); run it again") from None
    except OSError as error:  # --out not writable: found before the model loads
        raise click.ClickException(_cannot_write(error)) from None


def _probe_and_write(job: TextJob, notify: Callable[[str], None]) -> None:
    """Probe, print the table, then write ``--out`` / ``--plot``."""
    from isoprobe import jobs, models

    try:
        report = jobs.run(job, notify)
    except (ValueError, models.ModelLoadError) as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:  # --out / --plot not writable: found before the model loads
        raise click.ClickException(_cannot_write(error)) from None
    click.echo(jobs.render(report, job.fmt))
    try:
        jobs.write_outputs(report, job, notify)
    except OSError as error:
        raise click.ClickException(_cannot_write(error) + " (the table above is complete)") from None


def _cannot_write(error: OSError) -> str:
    return f"cannot write {error.filename or 'output'}: {error.strerror or error}"


@main.command("gpt2")
@click.option(
    "--model",
    default="gpt2",
    show_default=True,
    help="gpt2, another Hub id of a causal LM, or a local checkpoint PATH.",
)
@click.option(
    "--init",
    type=click.Choice(["pretrained", "random"]),
    default="pretrained",
    show_default=True,
    help="random: GPT-2 small's config with random weights (offline).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --init random and of dropout.")
@_text_probe_options
def gpt2_command(**options) -> None:
    """Token isometry before and after every LayerNorm and activation of GPT-2.

    One Gram per text over its tokens (Joudaki et al., App. C.4 / Fig. C.5); for every
    LayerNorm the Theorem 1 bound I(normalized) >= I(centered) * norm-variation factor.

    \b
    Example:
      isoprobe gpt2 --init random --text "The quick brown fox jumps over the lazy dog."
    """
    _run_text_probe("gpt2", **options)


@main.command("inspect")
@click.option("--model", required=True, help="A Hub id or local PATH of any transformers AutoModel.")
@click.option(
    "--dataset",
    default=None,
    help="Read texts from a datasets dataset: Hub name, saved directory or csv/json/parquet/txt file.",
)
@click.option("--split", default="train", show_default=True)
@click.option("--column", default="text", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=16, show_default=True, help="Rows to read.")
@click.option(
    "--baseline",
    type=click.Choice(["random"]),
    default=None,
    help="Also probe the same architecture at random init (seeded by --seed) on the same texts, and "
    "show trained against init per site (--out: baseline-random/, compare.txt, compare.png; "
    "--plot: the comparison figure).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --baseline random and of dropout.")
@click.option(
    "--device-map",
    default=None,
    help="Split the model over this machine's GPUs, CPU and disk with accelerate: auto, balanced, "
    "balanced_low_0 or sequential (--device is then unused).",
)
@click.option("--max-memory", default=None, help="With --device-map: limits per device, e.g. 0=20GiB,cpu=64GiB.")
@click.option(
    "--offload-folder",
    type=click.Path(file_okay=False),
    default=None,
    help="With --device-map: where weights offloaded to the disk go.",
)
@_text_probe_options
def inspect_command(**options) -> None:
    """Token isometry at every norm and activation of any transformers model (BERT, GPT-2,
    Llama-style, ...), with the Theorem 1 check at every norm.

    \b
    Examples:
      isoprobe inspect --model bert-base-uncased --text "Norms make tokens isometric."
      isoprobe inspect --model ./my-checkpoint --dataset texts.csv --column sentence --plot gaps.png
      isoprobe inspect --model ./my-checkpoint --text-file texts.txt --baseline random --out run/
      torchrun --nproc_per_node=4 -m isoprobe inspect --model M --dataset corpus.jsonl --limit 10000 --out run/
      isoprobe inspect --model ./big-checkpoint --device-map auto --text-file texts.txt
    """
    from isoprobe import distributed

    if distributed.launched_by_torchrun():  # one corpus shared among the ranks (isoprobe.corpus)
        _run_corpus(**options)
    else:
        _run_text_probe("auto", **options)


def _run_corpus(**options) -> None:
    """``inspect`` under torchrun: every rank probes its share; rank 0 prints and writes."""
    from isoprobe import corpus, distributed, jobs, models, outlock

    def notify(message: str) -> None:
        click.echo(message, err=True)

    job = jobs.TextJob(family="auto", **options)
    with distributed.torchrun_group() as (rank, _world):
        held = distributed.hold_folder_on_root(job.out, rank, _command_line(), notify) if job.out else None
        try:
            with held or contextlib.nullcontext():
                result = corpus.run_corpus(job, notify)
        except outlock.FolderBusy as error:
            raise FolderInUse(str(error)) from None
        except (ValueError, models.ModelLoadError) as error:
            raise click.UsageError(str(error)) from None
        except OSError as error:
            raise click.ClickException(_cannot_write(error)) from None
        if result is None:
            return
        click.echo(jobs.render(result.report, job.fmt))
        try:
            corpus.write_corpus_outputs(result, job, lambda message: click.echo(message, err=True))
        except OSError as error:
            raise click.ClickException(_cannot_write(error) + " (the table above is complete)") from None


# --- compare: several probe runs side by side -----------------------------------------------------


@main.command("compare")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Save the depth figure of all runs (PNG) here."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="What to print.",
)
def compare_command(runs: tuple[str, ...], plot: str | None, fmt: str) -> None:
    """Compare two or more probe runs: per site and point each run's isometry gap and its
    difference from the first run (A), and one depth figure of them all.

    A RUN is an --out folder of `isoprobe gpt2`/`inspect` or a records file (.json, .csv,
    .jsonl). Runs are compared on the sites and points they all have; what some lack is listed.

    \b
    Examples:
      isoprobe compare run-pretrained/ run-random/ --plot compare.png
      isoprobe compare step1000.jsonl step2000.jsonl step4000.jsonl
    """
    from isoprobe import compare, jobs

    if len(runs) < 2:
        raise click.UsageError("give two or more runs (--out folders or records files) to compare")
    try:
        if plot is not None:
            jobs.check_outputs(None, plot)
        comparison = compare.compare_runs([compare.load_run(r) for r in runs])
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:
        raise click.ClickException(_cannot_write(error)) from None
    if comparison.missing_text():
        click.echo(
            f"note: some runs lack points the others have; comparing the {len(comparison.keys)} shared ones", err=True
        )
    click.echo(compare.format_comparison(comparison) if fmt == "table" else compare.comparison_json(comparison))
    if plot is not None:
        try:
            compare.plot_comparison(comparison, plot)
        except OSError as error:
            raise click.ClickException(_cannot_write(error) + " (the table above is complete)") from None
        click.echo(f"wrote {plot}", err=True)
