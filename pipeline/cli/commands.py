"""Subcommands of `pipeline`; each is a thin wrapper over `stages.<name>.run`."""
from __future__ import annotations

import math
from collections.abc import Callable

import click

from pipeline.cli.app import (
    _with_overrides,
    main,
    optional_params_options,
    params_options,
    run_stage,
)
from pipeline.config.params import DEFAULT_PARAMS
from pipeline.config.schema import Params


@main.command("extract-features")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="all", show_default=True,
              help="Which cache to build: K augmented train views, or 1 plain view of the eval split.")
@click.option("--dataset", default=None, help="Shortcut for --set data.dataset=...")
@click.option("--views", type=int, default=None, help="Shortcut for --set extract.views=...")
@click.option("--workers", type=int, default=None, help="Dask local cluster of N workers.")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler.")
@click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default=None)
@click.option("--restart-on-change", is_flag=True,
              help="Delete a store whose fingerprint differs instead of refusing (used by dvc.yaml).")
@click.option("--break-lock", is_flag=True,
              help="Take over a store's writer lock left by a process on another host.")
@_with_overrides({"dataset": "data.dataset", "views": "extract.views", "workers": "extract.workers",
                  "scheduler": "extract.scheduler", "on_bad_image": "extract.on_bad_image"})
@params_options
def extract_features(params: Params, split: str, restart_on_change: bool, break_lock: bool) -> None:
    """Run the frozen CLIP once over the images; write spatial tokens to the Zarr cache."""
    run_stage("extract_features", params=params, split=split, restart_on_change=restart_on_change,
              break_lock=break_lock)


@main.command("verify")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="all", show_default=True,
              help="Which feature store(s) to check.")
@click.option("--repair", is_flag=True,
              help="Un-mark damaged shards so the next extract-features recomputes exactly those.")
@click.option("--inputs", is_flag=True,
              help="Also list the images and annotation files changed since extraction (exit 1 if any).")
@params_options
def verify(params: Params, split: str, repair: bool, inputs: bool) -> None:
    """Read every complete shard of the feature stores, check checksums and values; exit 1 on damage."""
    run_stage("verify", params=params, split=split, repair=repair, inputs=inputs)


@main.command("export-cache")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["hdf5"]), default="hdf5", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output file.")
@params_options
def export_cache(params: Params, split: str, fmt: str, out: str | None) -> None:
    """Write a feature store's arrays to one HDF5 file for tools that read HDF5."""
    run_stage("export_cache", params=params, split=split, fmt=fmt, out=out)


@main.command("train")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint.")
@click.option("--online", is_flag=True,
              help="Run the frozen backbone on every batch instead of reading the cache (comparison).")
@params_options
def train(params: Params, resume: bool, online: bool) -> None:
    """Train the text and image projectors (ASL + alpha * MFI) on the cached tokens."""
    run_stage("train", params=params, resume=resume, online=online)


@main.command("evaluate")
@click.argument("what", type=click.Choice(["mlr", "mfi", "seg", "zs-mlr", "all"]))
@click.option("--methods", type=click.Choice(["all", "baselines", "projectors"]), default="all",
              show_default=True,
              help="seg only: the methods without projectors (results/*/seg-baselines.*), those with "
                   "projectors (merging seg-baselines into seg.*), or all in one pass.")
@params_options
def evaluate(params: Params, what: str, methods: str) -> None:
    """Evaluate: multi-label mAP, MFI figure of merit, zero-shot segmentation, segment-driven ZS-MLR."""
    run_stage("evaluate", params=params, what=what, methods=methods)


@main.command("figures")
@params_options
def figures(params: Params) -> None:
    """Activation maps of a queried class: CLIP vs CLIP-VV vs ours."""
    run_stage("figures", params=params)


@main.command("ablate")
@click.option("--lambda", "lambdas", default=None, help="Comma-separated MFI lambdas (default: params).")
@click.option("--alpha", "alphas", default=None, help="Comma-separated MFI weights alpha.")
@click.option("--lambda1", "lambda1s", default=None, help="Comma-separated InfoCLIP compression weights.")
@click.option("--lambda2", "lambda2s", default=None, help="Comma-separated InfoCLIP distillation weights.")
@params_options
def ablate(params: Params, lambdas: str | None, alphas: str | None, lambda1s: str | None,
           lambda2s: str | None) -> None:
    """Train a lambda x alpha (x lambda1 x lambda2) grid in one pass over the cache per epoch."""
    def parse(text: str | None, flag: str) -> list[float] | None:
        if text is None:
            return None
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise click.BadParameter(f"must be comma-separated numbers, got {text!r}",
                                     param_hint=flag) from err
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            raise click.BadParameter(f"must be non-empty numbers >= 0, got {text!r}", param_hint=flag)
        return values

    run_stage("ablate", params=params, lambdas=parse(lambdas, "--lambda"),
              alphas=parse(alphas, "--alpha"), lambda1s=parse(lambda1s, "--lambda1"),
              lambda2s=parse(lambda2s, "--lambda2"))


@main.command("report")
@params_options
def report(params: Params) -> None:
    """Collect the metrics, tables and figures of a run into one Markdown report."""
    run_stage("report", params=params)


@main.command("download")
@click.option("--dataset", default=None,
              type=click.Choice(["coco2014", "coco2017", "voc2007", "voc2012", "synthetic"]),
              help="Only this one. Default (the DVC `data` stage): check every configured dataset, "
                   "fetch only what is missing.")
@params_options
def download(params: Params, dataset: str | None) -> None:
    """Check the configured datasets; fetch, verify and unpack one (synthetic: generate it)."""
    run_stage("download", params=params, dataset=dataset)


@main.command("configure")
@click.option("--params", "params_path", default=str(DEFAULT_PARAMS), show_default=True,
              type=click.Path(exists=True, dir_okay=False), help="Parameter file to edit.")
@click.option("--profile", default=None, help="Write this dataset profile's values: smoke, cpu-trial, coco, voc.")
@click.option("--recipe", default=None, help="Set the recipe: authors or paper.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Also set a key (repeatable).")
def configure(params_path: str, profile: str | None, recipe: str | None, overrides: tuple[str, ...]) -> None:
    """Write a profile / recipe / values into the params file, so `dvc repro` runs them too."""
    from pipeline.config.params import ParamError
    from pipeline.config.params import configure as write

    try:
        changed = write(params_path, profile, recipe, overrides)
    except ParamError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{params_path}: " + (f"set {', '.join(changed)}" if changed else "already as asked"))


@main.command("demo")
@click.option("--workdir", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the generated data, cache and results.")
@click.option("--recipe", type=click.Choice(["authors", "paper"]), default=None,
              help="Recipe (default: params.yaml's, authors).")
def demo(workdir: str, recipe: str | None) -> None:
    """Run the whole DAG on the embedded smoke profile (generated data, tiny backbone)."""
    run_stage("demo", workdir=workdir, recipe=recipe)


_RESIZE_HELP = ("keep: the photo's aspect ratio, short side the model's image size (long side at most 4x, "
                "both rounded up to the backbone's stride; mmsegmentation's rule); square: the released "
                "evaluation's squashed square view.")
_TEMPLATE_HELP = ("Prompt template with {} for the class name (repeatable: the templates' text features "
                  "are averaged). Default: the projectors' record (evaluate.prompt when trained).")
_MODEL_HELP = """

Every default comes from the projectors file's record (backbone weights, image size and resize,
prompt, background rule): a flag given overrides it, and the params' evaluate.seg values are the
evaluation's, not this command's. No params file is needed with --projectors or --run.

Open vocabulary by default: the text projector's running BatchNorm statistics, so one class works
and a class's score maps (CLIP, CLIP-VV, ours) do not depend on the other names asked;
--text-bn batch takes the statistics of the names asked, as the released ZS3 scripts do. Feature
surgery (the API's clip-surgery methods), the softmax background, the label map and
class-aggregated image scores compare the classes asked by definition."""


def _model_options(func: Callable) -> Callable:
    """--projectors, --run, --checkpoint, --text-bn, --device: which trained model, from where."""
    for option in reversed([
        click.option("--projectors", type=click.Path(dir_okay=False), default=None,
                     help="Trained projectors file (default: --run's or the params' evaluate.projectors)."),
        click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None,
                     help="A run directory (e.g. demo/, from `pipeline demo`): its configs/params.yaml's "
                          "evaluate.projectors file; outputs go under its results/."),
        click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="Backbone weights file, when not where the projectors' record says (or the "
                          "recorded BatchNorm statistics file of a random backbone)."),
        click.option("--text-bn", type=click.Choice(["running", "batch"]), default=None,
                     help="Text projector BatchNorm statistics [default: running; batch: of the names "
                          "asked, as the released ZS3 scripts]."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, auto [default: backbone.device, else auto]."),
    ]):
        func = option(func)
    return func


@main.command("segment")
@click.argument("images", nargs=-1, required=True)
@click.option("--classes", required=True, multiple=True,
              help="Comma-separated class names, any words (repeatable); labels 1..C in this order.")
@_model_options
@click.option("--background", type=click.Choice(["none", "softmax", "max-score"]), default=None,
              help="Background rule (label 0); default: the projectors' record (evaluate.seg.background "
                   "when trained).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Background threshold; default: the projectors' record.")
@click.option("--template", "templates", multiple=True, help=_TEMPLATE_HELP)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: results/segment).")
@click.option("--resize", type=click.Choice(["keep", "square"]), default="keep", show_default=True,
              help=_RESIZE_HELP)
@optional_params_options
def segment(params: Params | None, images: tuple[str, ...], classes: tuple[str, ...], projectors: str | None,
            run_dir: str | None, checkpoint: str | None, text_bn: str | None, device: str | None,
            background: str | None, threshold: float | None, templates: tuple[str, ...],
            out: str | None, resize: str) -> None:
    run_stage("segment", params=params, images=list(images), classes=list(classes), projectors=projectors,
              background=background, threshold=threshold, templates=list(templates), out=out,
              run_dir=run_dir, checkpoint=checkpoint, text_bn=text_bn, device=device, resize=resize)


segment.help = ("Segment image files, folders or globs into free-text classes: overlay, label PNG, JSON each."
                + _MODEL_HELP)


@main.command("query")
@click.argument("image")
@click.option("--text", required=True, help="The queried class, any words.")
@click.option("--against", multiple=True,
              help="Comma-separated classes to compare its text feature with (optional).")
@_model_options
@click.option("--template", "templates", multiple=True, help=_TEMPLATE_HELP)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: results/query).")
@click.option("--resize", type=click.Choice(["keep", "square"]), default="keep", show_default=True,
              help=_RESIZE_HELP)
@optional_params_options
def query(params: Params | None, image: str, text: str, against: tuple[str, ...], projectors: str | None,
          run_dir: str | None, checkpoint: str | None, text_bn: str | None, device: str | None,
          templates: tuple[str, ...], out: str | None, resize: str) -> None:
    run_stage("query", params=params, image=image, text=text, against=list(against),
              projectors=projectors, templates=list(templates), out=out, run_dir=run_dir,
              checkpoint=checkpoint, text_bn=text_bn, device=device, resize=resize)


query.help = ("One image, one class: CLIP vs ours activation, and text cosines to --against before/after."
              + _MODEL_HELP)
