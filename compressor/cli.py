"""`edgectl compress` and `edgectl demo` (loaded only when called, so devices never import onnx)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from compressor.progress import Terminated, library_logs_to, scratch_folder
from compressor.tasks import TaskConfig
from edge_runtime.core.errors import UsageError

if TYPE_CHECKING:
    import onnx

    from compressor.data import Dataset
    from compressor.pipeline import CompressionResult
    from edge_runtime.config.profiles import DeviceProfile

__all__ = ["compress", "demo"]


def _echo(line: str) -> None:
    click.echo(line, err=True)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Built-in profile name or a .toml file.")
@click.option(
    "--calibration",
    required=True,
    type=click.Path(path_type=Path),
    help=".npz/.npy file or folder of them: input name -> [samples, ...] arrays.",
)
@click.option(
    "--validation",
    type=click.Path(path_type=Path),
    help="Held-out samples, split into a selection half (every choice) and a report half (default: half "
    "of --calibration; neither is ever used to calibrate).",
)
@click.option("--labels", type=click.Path(path_type=Path), help=".npy class ids for the validation samples.")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path),
    help="ed25519 private key (edgectl keygen) that signs the bundle.",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle file to write.")
@click.option("--name", help="Model name in the bundle (default: the model file's stem).")
@click.option(
    "--version", "model_version", default="1", show_default=True, help="Model version in the bundle."
)
@click.option(
    "--calibrate-method",
    type=click.Choice(["MinMax", "Percentile", "Entropy"]),
    default="MinMax",
    show_default=True,
)
@click.option("--float-compute", is_flag=True, help="Store weights int8 but never compute in int8.")
@click.option(
    "--recipe",
    help="Passes in order, e.g. prepare,distill,int8, or a .toml recipe (passes, tasks, metric, options).",
)
@click.option(
    "--task",
    "task_options",
    multiple=True,
    metavar="OUTPUT=KIND[:MIN]",
    help="How to judge an output: classes, ctc, detection, boxes, embedding, decision, regression "
    "(default: guessed from its shape); MIN is its budget on that task's metric. Repeatable.",
)
@click.option(
    "--state-from",
    "state_pairs",
    multiple=True,
    metavar="INPUT=OUTPUT",
    help="Stateful model: feed each sample's INPUT with the OUTPUT the model produced for the sample "
    "before it (the data files in stream order). Repeatable.",
)
@click.option("--metric", help="Your own metric, module:function(reference, candidate, labels) -> float.")
@click.option("--metric-min", type=float, help="Budget for --metric (default: the profile's pp budget).")
@click.option(
    "--search/--no-search",
    default=None,
    help="Try candidate recipes and keep the smallest within budget (default: the profile's setting).",
)
@click.option(
    "--chart", type=click.Path(path_type=Path), help="With --search: write the candidates as a PNG."
)
@click.option("--force", is_flag=True, help="Overwrite the output file.")
@click.option(
    "--log-file",
    type=click.Path(path_type=Path),
    help="Where ONNX Runtime's and TensorFlow's own messages go (default: OUTPUT.log, kept only if non-empty).",
)
def compress(
    model: Path,
    profile_name: str,
    calibration: Path,
    validation: Path | None,
    labels: Path | None,
    key_path: Path,
    output: Path,
    name: str | None,
    model_version: str,
    calibrate_method: str,
    float_compute: bool,
    recipe: str | None,
    search: bool | None,
    chart: Path | None,
    force: bool,
    log_file: Path | None,
    task_options: tuple[str, ...],
    metric: str | None,
    metric_min: float | None,
    state_pairs: tuple[str, ...],
) -> None:
    """Compress an ONNX MODEL for a device profile into a signed bundle, and print the measured report."""
    from edge_runtime.artifact.signing import load_private_key
    from edge_runtime.config.profiles import load_profile

    check_output_path(output, force)
    if chart is not None:
        check_output_path(chart, force=True)
    profile = load_profile(profile_name)
    passes, tasks, pass_options = _recipe(recipe, task_options, metric, metric_min, profile)
    searching = (profile.compression.search and passes is None) if search is None else search
    if searching and passes is not None:
        raise UsageError("--recipe passes and --search exclude each other: a search tries its own recipes")
    if chart and not searching:
        raise UsageError("--chart draws the candidates of a recipe search: add --search")
    private_key = load_private_key(key_path)
    log_path = log_file or output.with_name(output.name + ".log")
    try:
        with scratch_folder() as scratch, library_logs_to(log_path) as write:
            int8_options = {"calibrate_method": calibrate_method, "allow_int8_compute": not float_compute}
            pass_options = {**pass_options, "int8": {**int8_options, **pass_options.get("int8", {})}}
            states = _state_pairs(state_pairs)
            job = _Job(model, profile, passes, searching, pass_options, tasks, states, scratch, write)
            result = _run(job, calibration, validation, labels)
    except Terminated as exc:
        click.echo(f"error: stopped by {exc}; temporary files removed, nothing written", err=True)
        raise click.exceptions.Exit(128 + exc.signum) from None
    if log_path.exists():
        _echo(f"library messages (ONNX Runtime, TensorFlow) are in {log_path}")
    from compressor.bundling import write_result_bundle
    from edge_runtime.artifact.report_text import format_report

    write_result_bundle(
        result,
        output,
        name=name or model.stem,
        version=model_version,
        profile=profile,
        private_key=private_key,
        force=force,
    )
    click.echo(format_report(result.report))
    if chart:
        from compressor.chart import write_search_chart

        click.echo(f"wrote chart {write_search_chart(result.report, chart)}")
    click.echo(f"wrote {output} ({output.stat().st_size} bytes)")


def check_output_path(path: Path, force: bool) -> None:
    """Refuse, before any work, an output path that is a folder, exists (without --force) or
    cannot be written."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give the file to write (e.g. {path / 'model.edgebundle'})")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise UsageError(f"output folder {path.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc


def _recipe(
    recipe: str | None,
    task_options: tuple[str, ...],
    metric: str | None,
    metric_min: float | None,
    profile: DeviceProfile,
) -> tuple[tuple[str, ...] | None, TaskConfig, dict[str, dict[str, Any]]]:
    """Passes, tasks and pass options from --recipe (a list or a .toml file), --task and --metric,
    all checked (passes known, their libraries installed) before any work."""
    from compressor.passes import check_recipe
    from compressor.pipeline import default_recipe
    from compressor.recipe_file import load_recipe_file
    from compressor.tasks import load_metric, parse_task_option

    passes: tuple[str, ...] | None = None
    tasks, options = TaskConfig(), dict[str, dict[str, Any]]()
    if recipe and recipe.endswith(".toml"):
        loaded = load_recipe_file(Path(recipe))
        passes, tasks = loaded.passes, loaded.tasks
        options = {name: dict(values) for name, values in loaded.options.items()}
    elif recipe:
        passes = tuple(part.strip() for part in recipe.split(",") if part.strip())
    check_recipe(passes if passes is not None else default_recipe(profile))
    specs = dict(tasks.specs) | dict(parse_task_option(text) for text in task_options)
    if metric_min is not None and metric is None and tasks.metric is None:
        raise UsageError("--metric-min is the budget of --metric: give --metric module:function too")
    custom = load_metric(metric, metric_min) if metric else tasks.metric
    return passes, TaskConfig(specs=specs, metric=custom), options


@dataclass(frozen=True)
class _Job:
    """What to run once the data is loaded."""

    model: Path
    profile: DeviceProfile
    passes: tuple[str, ...] | None
    searching: bool
    pass_options: dict[str, dict[str, Any]]
    tasks: TaskConfig
    states: dict[str, str]
    scratch: Path
    write: Callable[[str], None]


def _state_pairs(texts: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for text in texts:
        state_input, sep, state_output = text.partition("=")
        if not sep or not state_input or not state_output:
            raise UsageError(f"--state-from {text!r}: expected INPUT=OUTPUT, e.g. state=stateN")
        pairs[state_input] = state_output
    return pairs


def _with_states(job: _Job, original: onnx.ModelProto, data: Dataset) -> Dataset:
    """The data with each state input carried from the model's own state output (--state-from)."""
    if not job.states:
        return data
    from compressor.data import Dataset, carry_states
    from compressor.measure import make_session

    inputs = {value.name for value in original.graph.input}
    outputs = [value.name for value in original.graph.output]
    for state_input, state_output in job.states.items():
        if state_input not in inputs or state_output not in outputs:
            raise UsageError(
                f"--state-from {state_input}={state_output}: the model has inputs {', '.join(sorted(inputs))} "
                f"and outputs {', '.join(outputs)}"
            )
    session = make_session(original.SerializeToString(), job.profile)
    samples = carry_states(
        data.samples, lambda feed: dict(zip(outputs, session.run(None, feed), strict=True)), job.states
    )
    job.write(
        f"note: states {', '.join(job.states)} carried from the model's own outputs over {len(samples)} samples"
    )
    return Dataset(samples, data.labels, data.notes)


def _check_task_outputs(tasks: TaskConfig, outputs: list[str]) -> None:
    unknown = sorted(set(tasks.specs) - set(outputs))
    if unknown:
        raise UsageError(
            f"--task '{unknown[0]}': the model has no such output (outputs: {', '.join(outputs)})"
        )


def _run(job: _Job, calibration: Path, validation: Path | None, labels: Path | None) -> CompressionResult:
    """Load the model and data (three disjoint splits), then compress: one recipe, or a search."""
    from compressor.data import load_dataset, split
    from compressor.onnx_model import load_model, tensor_specs
    from compressor.pipeline import compress as run_compress

    original = load_model(job.model)
    _check_task_outputs(job.tasks, [out.name for out in original.graph.output])
    inputs = tensor_specs(list(original.graph.input), {init.name for init in original.graph.initializer})
    data = _with_states(
        job, original, load_dataset(calibration, inputs, labels if validation is None else None)
    )
    if validation is None:  # half calibrates; the other half selects (1/4) and reports (1/4)
        calibration_set, validation_set = split(data, held_out=0.5)
    else:
        calibration_set = data
        validation_set = _with_states(job, original, load_dataset(validation, inputs, labels))
    for note in data.notes:
        job.write(f"note: {note}")
    common: dict[str, Any] = {
        "validation": validation_set.samples,
        "labels": validation_set.labels,
        "tasks": job.tasks,
        "workdir": job.scratch,
        "log": job.write,
    }
    if job.searching:
        from compressor.recipe import Recipe, candidate_recipes, search_recipes

        candidates = [
            Recipe(r.name, r.passes, {**job.pass_options, **r.options, "int8": job.pass_options["int8"]})
            for r in candidate_recipes(job.profile, log=job.write)
        ]
        return search_recipes(
            job.model, job.profile, calibration_set.samples, recipes=candidates, **common
        ).chosen
    return run_compress(
        job.model,
        job.profile,
        calibration_set.samples,
        recipe=job.passes,
        pass_options=job.pass_options,
        **common,
    )


@click.command()
@click.option("--profile", "profile_name", default="x86-vnni-gateway", show_default=True)
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Keep the bundle and keys here.")
def demo(profile_name: str, output_dir: Path | None) -> None:
    """Train the embedded digits model, compress it, sign, verify and self-test the bundle."""
    from compressor.bundling import write_result_bundle
    from compressor.demo_model import train_digits_model
    from compressor.pipeline import compress as run_compress
    from edge_runtime.artifact.bundle import read_bundle
    from edge_runtime.artifact.report_text import format_report
    from edge_runtime.artifact.signing import generate_keypair, load_private_key, load_public_key
    from edge_runtime.config.profiles import load_profile
    from edge_runtime.engines import load_backend
    from edge_runtime.engines.selftest import run_selftest

    profile = load_profile(profile_name)
    workdir = output_dir or Path(tempfile.mkdtemp(prefix="edgectl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _echo("training the digits MLP (scikit-learn digits, 64-128-10)...")
    task = train_digits_model()
    model_path = workdir / "digits.onnx"
    model_path.write_bytes(task.model)
    private_path, public_path = generate_keypair(workdir, "demo", force=True)
    result = run_compress(
        model_path, profile, task.calibration, validation=task.validation, labels=task.labels, log=_echo
    )
    bundle_path = workdir / "digits.edgebundle"
    write_result_bundle(
        result,
        bundle_path,
        name="digits",
        version="1",
        profile=profile,
        private_key=load_private_key(private_path),
        force=True,
    )
    click.echo(format_report(result.report))
    bundle = read_bundle(bundle_path, load_public_key(public_path))
    backend = load_backend(bundle.manifest, bundle.model_bytes, profile)
    golden = bundle.manifest.golden
    if golden is None:
        raise UsageError(f"{bundle_path} carries no golden data to self-test")
    try:
        selftest = run_selftest(backend.run, bundle.golden_cases(), golden)
    finally:
        backend.close()
    click.echo(
        f"bundle {bundle_path}: signature OK (key {bundle.signed_by}), checksums OK, self-test "
        f"{'passed' if selftest.passed else 'FAILED: ' + selftest.reason} ({selftest.cases} golden cases)"
    )
