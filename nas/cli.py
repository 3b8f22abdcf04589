"""`vitnas` command line: parse, call the library, print. Owns no logic of its own."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable

from nas.errors import UserError, failure_line, one_line

EPILOG = """\
typical session:
  vitnas space show psvit-digits                 # what a space holds
  vitnas train-supernet --space psvit-digits --data digits --epochs 30
  vitnas rank-check --supernet vitnas-runs/supernet/psvit-digits --subnets 8 --epochs 10   # trust it?
  vitnas demo                                    # the whole pipeline on the embedded digits data

Every command takes --help. Spaces are YAML files; the shipped ones can be named without a path.
A failure is one line, `vitnas: error: ...`, exit code 2; --debug (or VITNAS_DEBUG=1) shows its traceback.
"""


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input, and failures of the machine (read-only or full disk, a store that
    cannot be opened, a corrupted weights file), end in one line on stderr and exit code 2; any
    other exception is a bug and keeps its traceback. ``--debug``/``VITNAS_DEBUG=1``: re-raise all."""
    _quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return _fail(str(err))
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("VITNAS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("vitnas: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        line = None if debug else failure_line(err, _where(args))
        if line is None:
            raise
        return _fail(line)


def _fail(line: str) -> int:
    print(f"vitnas: error: {one_line(line)}", file=sys.stderr)
    return 2


def _where(args) -> str | None:
    """The store or workspace a command used, for errors that name no file (sqlite's)."""
    uri = getattr(args, "tracking_uri", None) or getattr(args, "storage", None)
    if uri:
        uri = re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", uri)  # never print a password
        return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri
    workspace = getattr(args, "workspace", None)
    return os.path.abspath(workspace) if workspace else None


class UsageError(UserError):
    """A command line argparse refuses."""


class VitnasParser(argparse.ArgumentParser):
    """argparse in the house format: a refused command line is ``vitnas: error: <one line>``, exit
    code 2, like every other failure (argparse would print its usage and ``vitnas <cmd>: error:``).
    A flag's bad value reads ``--flag VALUE: what is allowed``."""

    def error(self, message: str):
        match = re.fullmatch(r"argument (\S+): (.*)", message, re.S)
        if match:
            flag, rest = match.group(1).split("/")[-1], match.group(2)
            if re.match(r"\S*: must be ", rest):  # from the value types below: "VALUE: must be ..."
                raise UsageError(f"{flag} {rest}")
            message = f"{flag}: {rest}"
        raise UsageError(f"{message} (see {self.prog} --help)")


def _shown(text: str) -> str:
    return text if text.strip() and " " not in text else repr(text)


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]."""
    allowed = f"at least {low} (a whole number)" if high is None else f"a whole number from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{_shown(text)}: must be {allowed}")
        return value

    return parse


def _finite(*, above_zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (or >= 0). nan and inf are refused: a budget of nan
    compares false with everything, and would run as no budget at all."""
    allowed = "a finite number > 0" if above_zero else "a finite number >= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
            raise argparse.ArgumentTypeError(f"{_shown(text)}: must be {allowed}")
        return value

    return parse


positive_int, nonnegative_int, port_number = _whole(1), _whole(0), _whole(0, 65535)
positive_float, nonnegative_float = _finite(above_zero=True), _finite(above_zero=False)


def _quiet_libraries() -> None:
    """Library chatter (MLflow's database set-up, deprecation notices) is not for the user."""
    import logging
    import os
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # it logs a database error's traceback before raising it again: main tells it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = VitnasParser(
        prog="vitnas",
        description="Hardware-aware architecture search over efficient Vision Transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from nas import __version__

    parser.add_argument("--version", action="version", version=f"vitnas {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a failure (also: VITNAS_DEBUG=1)"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


DATA_HELP = "digits, cifar10:PATH, cifar100:PATH or imagefolder:PATH (default %(default)s)"


def _store_options(p) -> None:
    """Where a command reading campaigns finds the MLflow store."""
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the workspace's sqlite file)")
    p.add_argument(
        "--workspace", default="vitnas-runs", help="default tracking store location (default %(default)s)"
    )


def _quiet_option(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# -- vitnas space ----------------------------------------------------------------------------
def _space_commands(sub) -> None:
    space = sub.add_parser("space", help="inspect search spaces", description="Inspect search-space files.")
    space_sub = space.add_subparsers(title="space commands", metavar="SUBCOMMAND")
    show = space_sub.add_parser(
        "show",
        help="print a space's choices, member count, largest and smallest architecture",
        description="Validate a search-space file and print what it holds.",
    )
    show.add_argument("file", help="a space YAML file, or the name of a shipped space (e.g. psvit-digits)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(run=_space_show)
    ls = space_sub.add_parser("list", help="list the shipped spaces")
    ls.set_defaults(run=_space_list)
    space.set_defaults(run=lambda _args: space.print_help() or 2)


def _space_show(args) -> int:
    from nas.space import load_space

    space = load_space(args.file)
    largest, smallest = space.largest(), space.smallest()
    info = {
        "name": space.name,
        "source": space.source,
        "family": space.family,
        "members": space.count(),
        "choices": space.describe(),
        "largest": largest.to_dict(),
        "smallest": smallest.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from nas.report import format_space

    print(format_space(space, largest, smallest))
    return 0


def _space_list(_args) -> int:
    from nas.space import load_space, shipped_spaces

    for name in shipped_spaces():
        space = load_space(name)
        print(f"{name:<20} {space.family:<6} {space.count():>16,} members  {space.spec.description}")
    return 0


# -- vitnas search / pareto -----------------------------------------------------------------------
def _search_command(sub) -> None:
    p = sub.add_parser(
        "search",
        help="run (or resume) a search campaign",
        description=(
            "Multi-objective search (max validation accuracy with inherited weights, min latency measured "
            "on the target). Running the same command again resumes the campaign: finished trials are kept."
        ),
        epilog="example:\n  vitnas search --space psvit-digits --supernet vitnas-runs/supernet/psvit-digits/supernet.safetensors \\\n"
        "      --target cpu:threads=2 --trials 60 --campaign digits-cpu --latency-budget-ms 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True, help="search-space YAML file or shipped space name")
    p.add_argument("--supernet", help="supernet checkpoint (.safetensors) for psvit spaces")
    p.add_argument(
        "--weights",
        help="timm spaces: the model's weights, a local .safetensors (e.g. from vitnas finetune; "
        "default: the space's weights:)",
    )
    p.add_argument(
        "--target",
        default="cpu:threads=2",
        help="where latency is measured, e.g. cpu:threads=2,batch=1 (default %(default)s)",
    )
    p.add_argument(
        "--trials",
        type=positive_int,
        default=60,
        help="finished trials the campaign should have (default %(default)s)",
    )
    p.add_argument(
        "--campaign", required=True, help="campaign name: the Optuna study and the MLflow parent run"
    )
    p.add_argument("--sampler", default="nsga2", help="nsga2 (default), nsga3, tpe or random")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default %(default)s)")
    p.add_argument(
        "--latency-budget-ms", type=positive_float, help="latency budget, an Optuna constraint (<= is feasible)"
    )
    p.add_argument(
        "--workspace", default="vitnas-runs", help="where everything is written (default %(default)s)"
    )
    p.add_argument(
        "--storage", help="Optuna storage URL (default: sqlite file in the workspace; PostgreSQL works)"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: sqlite file in the workspace; or http://server)"
    )
    p.add_argument("--cache-url", help="latency cache SQLAlchemy URL (default: sqlite file in the workspace)")
    p.add_argument(
        "--heartbeat-s", type=positive_float, default=10.0, metavar="S",
        help="workers sharing a PostgreSQL study (see docs/teams.md) mark their running trials alive every S "
        "seconds; a trial silent for 3 x S is a dead worker's and is failed (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--predictor",
        help="latency table from `vitnas latency-table build`: measure only promising candidates",
    )
    p.add_argument("--data", help="data spec for validation (default: the supernet's)")
    p.add_argument(
        "--measure-budget-s",
        type=positive_float,
        default=2.0,
        help="time budget per latency measurement (default %(default)s)",
    )
    p.add_argument(
        "--eval-device",
        default="auto",
        metavar="DEVICE",
        help="where candidates' accuracy is computed: auto (the target's device if a CUDA target, else "
        "cpu; with --gpus-per-trial: cuda), cpu, cuda or cuda:N; a resumed campaign may change it",
    )
    p.add_argument(
        "--val-subset",
        type=positive_int,
        metavar="N",
        help="score accuracy on N validation images (a seeded, class-balanced subset; default: all); "
        "a resumed campaign keeps it",
    )
    _quiet_option(p)
    ray = p.add_argument_group("Ray cluster (--backend ray; see docs/cluster.md)")
    ray.add_argument(
        "--backend", choices=("local", "ray"), default="local", help="local Optuna loop (default) or Ray Tune"
    )
    ray.add_argument(
        "--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a local Ray)"
    )
    ray.add_argument(
        "--max-concurrent", type=positive_int, default=1, help="trials running at once (default %(default)s)"
    )
    ray.add_argument(
        "--target-resource",
        help="Ray custom resource of the target's nodes, NAME=AMOUNT (e.g. hw_xeon=1): trials run only there",
    )
    ray.add_argument(
        "--max-failures",
        type=nonnegative_int,
        default=5,
        help="retries of a trial whose node was lost (default %(default)s)",
    )
    ray.add_argument(
        "--gpus-per-trial",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each trial asks Ray for, fractions allowed (default %(default)s); with G > 0 "
        "accuracy is computed on the trial's GPU unless --eval-device says otherwise",
    )
    p.set_defaults(run=_search)


def _search(args) -> int:
    from nas.hardware.target import Target
    from nas.search.campaign import CampaignConfig, lock_for, run_campaign, scorer_for
    from nas.search.scoring import resolve_eval_device
    from nas.space import load_space

    options = None  # counts and budgets were checked by their argparse types
    if args.backend == "ray":
        from nas.search.ray_backend import RayOptions, parse_resource, run_ray_campaign

        options = RayOptions(
            address=args.address,
            max_concurrent=args.max_concurrent,
            target_resource=parse_resource(args.target_resource) if args.target_resource else {},
            max_failures=args.max_failures,
            gpus_per_trial=args.gpus_per_trial,
        )
    resolve_eval_device(args.eval_device, Target.parse(args.target))  # refused before anything is written
    space = load_space(args.space)
    config = CampaignConfig(
        name=args.campaign,
        space=space.source,
        target=args.target,
        trials=args.trials,
        workspace=args.workspace,
        supernet=args.supernet,
        sampler=args.sampler,
        seed=args.seed,
        latency_budget_ms=args.latency_budget_ms,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        cache_url=args.cache_url,
        predictor=args.predictor,
        data=args.data,
        measure_budget_s=args.measure_budget_s,
        weights=args.weights,
        eval_device=args.eval_device,
        val_subset=args.val_subset,
        heartbeat_s=args.heartbeat_s,
    ).resolved()
    # a second process stops here, before loading the supernet (local workers on PostgreSQL share it)
    with lock_for(config, shared=options is None):
        scorer = scorer_for(config, space)
        if options is not None:
            result = run_ray_campaign(config, space, scorer, options, progress=not args.quiet)
        else:
            result = run_campaign(config, space, scorer, progress=not args.quiet)
    from nas.report import format_front

    print(
        f"campaign {result.name}: {result.finished} finished, {result.failed} failed, {result.ran_now} run now"
    )
    noisy = [r["trial_number"] for r in result.front if r.get("latency_noisy")]
    if noisy:
        print(
            f"{len(noisy)} of {len(result.front)} front trials have noisy latencies (trials "
            f"{', '.join(map(str, noisy))}): still spread after re-measuring; measure again on a quieter machine"
        )
    print(format_front(result.front, config.latency_budget_ms))
    if scorer.weights_tag == "supernet_hash":  # how far the accuracies above rank as training would
        from nas.ranking.record import find, trust_line

        found = find(result.tracking_uri, scorer.weights_hash, [scorer.candidates.frozen, config.supernet])
        print(trust_line(found, config.supernet))
    print(f'MLflow: {result.tracking_uri} (parent run {result.parent_run_id}; filter tags.pareto = "true")')
    return 0


def _pareto_command(sub) -> None:
    p = sub.add_parser(
        "pareto",
        help="print a campaign's Pareto front",
        description="Print the accuracy/latency front of a campaign, read from MLflow.",
    )
    p.add_argument("--campaign", required=True)
    _store_options(p)
    p.add_argument(
        "--latency-budget-ms", type=positive_float,
        help="mark the best trial under this budget (default: the campaign's own budget)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_pareto)


def _pareto(args) -> int:
    from nas.report import format_front
    from nas.tracking import Campaign, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.workspace)
    campaign = Campaign(uri, args.campaign, read_only=True)  # reading never creates a store or experiment
    if not campaign.exists():
        raise UserError(f"no campaign {args.campaign!r} in {uri}")
    rows = campaign.front_rows(budget_ms=args.latency_budget_ms)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_front(rows, args.latency_budget_ms))
        parent = campaign.parent_run()
        from nas.ranking.record import campaign_line

        line = campaign_line(uri, parent.data.tags, parent.data.params) if parent is not None else None
        if line:
            print(line)
    return 0


# -- vitnas export / train / demo -----------------------------------------------------------------
def _export_command(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a trial: arch.yaml, the weights scored, train.yaml (and model.onnx)",
        description="Write a searched architecture, the weights the search scored it with (from the campaign's "
        "frozen copy, hash verified), a training recipe and a README into a folder; --onnx adds model.onnx.",
        epilog="examples:\n  vitnas export --campaign demo-psvit-digits --trial 12 --out exported/\n"
        "  vitnas export --run-id 3f2c... --out exported/ --onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="the trial's MLflow run id")
    which.add_argument("--campaign", help="campaign name (with --trial)")
    p.add_argument("--trial", type=nonnegative_int, help="trial number within the campaign")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--epochs", type=positive_int, default=30, help="epochs in the written train.yaml (default %(default)s)"
    )
    p.add_argument(
        "--onnx", action="store_true",
        help="also write model.onnx (opset 17, dynamic batch), checked against PyTorch with ONNX Runtime "
        "(needs the onnx extra: pip install 'vitnas[onnx]')",
    )  # fmt: skip
    _store_options(p)
    p.set_defaults(run=_export)


def _export(args) -> int:
    from nas.export import export_trial
    from nas.tracking import default_tracking_uri

    if args.campaign and args.trial is None:
        raise UserError("--campaign needs --trial N")
    result = export_trial(
        args.tracking_uri or default_tracking_uri(args.workspace),
        args.out,
        run_id=args.run_id,
        campaign=args.campaign,
        trial=args.trial,
        epochs=args.epochs,
        onnx=args.onnx,
    )
    print(
        f"exported arch {result.arch_hash} (run {result.run_id}) to {result.out}: {', '.join(result.files)}"
    )
    print(f"train it:  vitnas train {result.out / 'train.yaml'}")
    return 0


def _train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an exported architecture from its train.yaml",
        description="Train (or fine-tune) an exported architecture; reports test accuracy, logs to MLflow.\n"
        "Runs on one device, or on several processes under torchrun (see TRAINING below).",
        epilog=TRAINING_EPILOG.format(command="train exported/train.yaml"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="train.yaml written by vitnas export")
    p.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    p.add_argument("--aug", help="override the recipe's augmentation preset: none, light or deit")
    _runtime_options(p, plain=True)
    _quiet_option(p)
    p.set_defaults(run=_train)


def _train(args) -> int:
    from nas.train import train_from_recipe

    overrides = {"aug": args.aug} if args.aug else {}
    outcome = train_from_recipe(
        args.recipe, epochs=args.epochs, device=args.device, runtime={**_runtime(args), **overrides},
        progress=not args.quiet,
    )  # fmt: skip
    if outcome is None:  # a torchrun process other than rank 0
        return 0
    print(
        f"test accuracy {outcome.test_accuracy:.4f} (validation {outcome.val_accuracy:.4f}); weights {outcome.weights}"
    )
    if outcome.run_id:
        print(f"MLflow run {outcome.run_id}")
    return 0


TRAINING_EPILOG = """\
TRAINING on more hardware (the same command, the same global --batch-size):
  one GPU:           vitnas {command} --device cuda --precision bf16
  2 processes here:  torchrun --standalone --nproc_per_node 2 -m nas {command}
  (gloo on CPUs, NCCL on GPUs; --batch-size is split over processes x --accum-steps)
"""


def _runtime_options(p, *, plain: bool) -> None:
    """Where and how a training run computes: not what it learns, so a resume may change them."""
    from nas.training.config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("devices and precision")
    g.add_argument(
        "--device", default="auto",
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N; under torchrun auto and cuda take "
        "each process's local GPU (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--precision", default=d.precision,
        help="fp32, bf16 (autocast; CPUs too) or fp16 (autocast and a gradient scaler; CUDA only) "
        "(default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--accum-steps", type=positive_int, default=d.accum_steps,
        help="micro-batches accumulated per optimizer step (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--loader-workers", type=nonnegative_int, default=d.loader_workers,
        help="DataLoader processes for data read from disk; digits stays in memory (default %(default)s)",
    )  # fmt: skip
    if plain:
        g.add_argument("--compile", action="store_true", help="torch.compile the model")


def _runtime(args) -> dict:
    keys = ("precision", "accum_steps", "loader_workers", "compile")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _demo_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded digits data (what `make demo` runs)",
        description="Train a supernet on scikit-learn's digits, search, tag the Pareto front, export the most "
        "accurate architecture under the latency budget and retrain it briefly. Re-running continues.",
    )
    p.add_argument("--workspace", help="where everything is written (default vitnas-runs)")
    p.add_argument("--target", help="latency target (default cpu:threads=2,batch=1)")
    p.add_argument("--trials", type=positive_int, help="search trials (default 60)")
    p.add_argument(
        "--supernet-epochs", type=positive_int, help="supernet training epochs (default: the trainer's default)"
    )
    p.add_argument("--retrain-epochs", type=positive_int, help="epochs of the final short retrain (default 3)")
    p.add_argument(
        "--latency-budget-ms",
        type=positive_float,
        help="default: between the smallest and largest member's latency here",
    )
    p.add_argument("--sampler", help="search sampler (default nsga2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_demo)


def _demo(args) -> int:
    from nas.demo import DemoConfig, run_demo

    given = {k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__ and v is not None}
    run_demo(DemoConfig(**given, progress=not args.quiet))
    return 0


# -- vitnas profile / latency-table ---------------------------------------------------------------
def _profile_command(sub) -> None:
    from nas.hardware.reduce_grammar import REDUCE_HELP

    p = sub.add_parser(
        "profile",
        help="params, GFLOPs and measured latency of one model",
        description="Parameters and GFLOPs (batch 1) and latency measured on the target of an architecture "
        "file or a timm model (built with pretrained=False: nothing downloads).",
        epilog=f"--reduce grammar (timm models):\n{REDUCE_HELP}\n\nexamples:\n"
        "  vitnas profile --arch arch.yaml --target cpu:threads=2,batch=1\n"
        "  vitnas profile --timm deit_small_patch16_224 --reduce tome:r=8 --json\n"
        "  vitnas profile --timm deit_small_patch16_224 --reduce evit:keep=0.7,layers=3/6/9 --no-latency",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="architecture file (arch.yaml or .json, psvit or timm family)")
    which.add_argument("--timm", metavar="NAME", help="a timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument(
        "--reduce", metavar="SPEC", help="token reduction for a timm model, e.g. tome:r=8 (grammar below)"
    )
    p.add_argument(
        "--target", default="cpu:threads=2,batch=1", help="where latency is measured (default %(default)s)"
    )
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=3.0,
        help="time budget of the latency measurement (default %(default)s)",
    )
    p.add_argument("--no-latency", action="store_true", help="FLOPs and params only, measure nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_profile)


def _profile(args) -> int:
    from nas.hardware.profile import load_model, profile
    from nas.hardware.reduce_grammar import parse_reduce
    from nas.hardware.target import Target

    if args.reduce:
        parse_reduce(args.reduce)  # a bad spec fails before any model is built
    target = None if args.no_latency else Target.parse(args.target)
    model = load_model(arch=args.arch, timm_name=args.timm, reduce=args.reduce)
    result = profile(model, target, time_budget_s=args.budget_s)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from nas.report import format_table

        print(format_table([result.row()]))
    return 0


def _latency_table_command(sub) -> None:
    from nas.hardware import table_defaults as lt_defaults

    lt = sub.add_parser(
        "latency-table",
        help="build a per-target latency predictor table",
        description="Latency lookup tables for the latency predictor.",
    )
    lt_sub = lt.add_subparsers(title="latency-table commands", metavar="SUBCOMMAND")
    b = lt_sub.add_parser(
        "build",
        help="measure a space's parts on the target into a table (resumable)",
        description="Measure every part a space's subnets run (stem, cells with their token reduction, pooling, "
        "head) over a grid of token counts on the target, then fit the overhead on a few whole subnets. "
        "Interrupted builds resume: measurements already in the table file are kept.",
        epilog="example:\n  vitnas latency-table build --space psvit-digits --target cpu:threads=2,batch=1\n"
        "then: vitnas search ... --predictor TABLE",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--space", required=True, help="search-space YAML file or shipped space name")
    b.add_argument("--target", default="cpu:threads=2,batch=1", help="where parts are measured (default %(default)s)")
    b.add_argument("--out", help="table file (default: WORKSPACE/latency-tables/SPACE-FINGERPRINT-TARGET.json)")
    b.add_argument("--workspace", default="vitnas-runs", help="default location of the table (default %(default)s)")
    b.add_argument("--force", action="store_true", help="start afresh, replacing any table at --out")
    b.add_argument("--passes", type=positive_int, default=lt_defaults.PASSES, help="measurements per point, median kept (default %(default)s)")
    b.add_argument("--budget-s", type=positive_float, default=lt_defaults.PART_BUDGET_S, help="time budget per part measurement (default %(default)s)")
    b.add_argument("--fit-subnets", type=nonnegative_int, default=lt_defaults.FIT_SUBNETS, help="whole subnets measured to fit the overhead (default %(default)s)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=_latency_table_build)
    lt.set_defaults(run=lambda _args: lt.print_help() or 2)


def _latency_table_build(args) -> int:
    from nas.hardware.latency_table import build_table, default_table_path
    from nas.hardware.target import Target
    from nas.space import load_space

    space, target = load_space(args.space), Target.parse(args.target)
    out = args.out or default_table_path(space, target, args.workspace)
    report = build_table(
        space, target, out, force=args.force, passes=args.passes, budget_s=args.budget_s,
        fit_subnets=args.fit_subnets, progress=not args.quiet,
    )  # fmt: skip
    table, o = report.table, report.table.overhead
    print(
        f"latency table {report.path}: {len(table.parts)} parts, {sum(map(len, table.parts.values()))} points, up to "
        f"{args.passes} passes: {report.measured_now + report.reused} measurements ({report.measured_now} now, "
        f"{report.reused} kept), fingerprint {table.digest}, "
        f"{table.build_s:.0f} s in all"
    )
    print(
        f"overhead fitted on {len(table.subnets)} subnets: latency = {o.constant_ms:.4g} ms + {o.scale:.4g} x "
        f"sum of parts; fit error {report.fit_mape:.1f}% MAPE"
    )
    return 0


# -- vitnas dashboard -----------------------------------------------------------------------------
def _dashboard_command(sub) -> None:
    p = sub.add_parser(
        "dashboard",
        help="browse campaigns' Pareto fronts in a web browser (read-only, works offline)",
        description="Serve the Pareto explorer: campaigns, accuracy against latency with the front, a "
        "latency-budget slider, architectures drawn, fronts of several targets side by side. Reads MLflow only.",
        epilog="example:\n  vitnas dashboard --tracking-uri sqlite:///$PWD/vitnas-runs/mlflow.db\n"
        "then open http://127.0.0.1:8765/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _store_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=port_number, default=8765, help="port (default %(default)s; 0: any free port)")
    p.add_argument(
        "--cache-ttl", type=nonnegative_float, default=30.0, help="seconds a campaign read from MLflow is reused (default %(default)s)"
    )
    p.set_defaults(run=_dashboard)


def _dashboard(args) -> int:
    from nas.dashboards.app import serve
    from nas.tracking import default_tracking_uri, require_store

    uri = args.tracking_uri or default_tracking_uri(args.workspace)
    require_store(uri)  # the dashboard only reads: a missing store is an error, never a new file
    serve(uri, args.host, args.port, args.cache_ttl)
    return 0


# -- vitnas finetune (timm spaces) -----------------------------------------------------------------
def _finetune_command(sub) -> None:
    from nas.adaptive_spec import SPEC_HELP as ADAPTIVE_HELP

    p = sub.add_parser(
        "finetune",
        help="fine-tune a timm space's model on your data (before a reduction-schedule search)",
        description=(
            "Train the model of a timm space (family: timm) for a few epochs on the search's data, from\n"
            "a local weights file or from scratch (nothing downloads), so that each reduction schedule is\n"
            "scored with meaningful accuracy. Writes a safetensors file for vitnas search --weights."
        ),
        epilog="example:\n  vitnas finetune --space deit-reduction --data digits --epochs 3 --out vitnas-runs/deit-s.safetensors\n"
        "  vitnas search --space deit-reduction --weights vitnas-runs/deit-s.safetensors --campaign deit-cpu --trials 24\n"
        "  vitnas finetune --space adavit-deit --init vitnas-runs/deit-s.safetensors --adaptive --out vitnas-runs/adavit.safetensors\n\n"
        f"--adaptive grammar:\n{ADAPTIVE_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True, help="search-space YAML file or shipped space name (timm or adaptive family)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--data", default="digits", help=DATA_HELP)
    p.add_argument("--init", help="start from these weights (.safetensors; default: the space's weights:, else scratch)")
    p.add_argument("--epochs", type=positive_int, default=3, help="default %(default)s")
    p.add_argument("--batch-size", type=positive_int, default=64, help="global batch (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--aug", default="light", help="augmentation preset: none, light or deit (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    ada = p.add_argument_group("AdaViT (input-adaptive patches, heads and sub-layers; grammar below)")
    ada.add_argument(
        "--adaptive", metavar="SPEC", nargs="?", const="space",
        help="train AdaViT decision networks at these budgets (alone: an adaptive space's own ranges)",
    )  # fmt: skip
    ada.add_argument("--train-backbone", action="store_true", help="train the backbone too (default: decision networks only)")
    ada.add_argument("--resume", action="store_true", help="continue the training state beside --out (OUT.train/)")
    ada.add_argument("--force", action="store_true", help="start over even if a training state is beside --out")
    ada.add_argument("--tracking-uri", help="log the run to MLflow here (default: $MLFLOW_TRACKING_URI if set, else no logging)")
    _runtime_options(p, plain=True)
    _quiet_option(p)
    p.set_defaults(run=_finetune)


def _finetune(args) -> int:
    from nas.finetune import QUICK, finetune
    from nas.space import load_space

    config = QUICK.replace(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, aug=args.aug, **_runtime(args)
    )
    space = load_space(args.space)
    adaptive = {}
    if args.adaptive is not None:
        from nas.adaptive_spec import parse_adaptive

        adaptive = dict(
            adaptive=parse_adaptive(args.adaptive), train_backbone=args.train_backbone, resume=args.resume,
            force=args.force, tracking_uri=args.tracking_uri,
        )  # fmt: skip
    elif args.train_backbone or args.resume or args.force or args.tracking_uri:
        raise UserError("--train-backbone, --resume, --force and --tracking-uri go with --adaptive")
    outcome = finetune(
        space, args.out, data=args.data, config=config, init=args.init, device=args.device, progress=not args.quiet,
        **adaptive,
    )  # fmt: skip
    if outcome is None:  # a torchrun process other than rank 0
        return 0
    print(f"validation accuracy {outcome.val_accuracy:.4f}; weights {outcome.weights}")
    if space.family == "adaptive" and not adaptive:  # a backbone: its decision networks come next
        print(f"next: vitnas finetune --space {args.space} --init {outcome.weights} --adaptive --out ADAVIT.safetensors")
        return 0
    space_arg = args.space if space.family == "adaptive" or not adaptive else "ADAPTIVE-SPACE (family: adaptive)"
    print(f"next: vitnas search --space {space_arg} --weights {outcome.weights} --data {args.data} --campaign NAME")
    return 0


# -- vitnas train-supernet ------------------------------------------------------------------------
def _train_supernet_command(sub) -> None:
    from nas.training.config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train-supernet",
        help="train the weight-sharing supernet of a psvit space",
        description=(
            "Train a space's weight-sharing supernet with the sandwich rule: every step trains the largest,\n"
            "the smallest and random subnets, distilled in place from the largest (BigNAS); AdamW with warm-up\n"
            "and cosine decay. A checkpoint (safetensors + JSON sidecar) goes to WORKSPACE/supernet/<space>/\n"
            "after every epoch; --resume continues a stopped run exactly as if it had not stopped."
        ),
        epilog="example:\n  vitnas train-supernet --space psvit-digits --data digits --epochs 40 --workspace vitnas-runs\n\n"
        + TRAINING_EPILOG.format(command="train-supernet --space psvit-digits")
        + "  a Ray cluster:     vitnas train-supernet --space psvit-digits --backend ray --address HOST:6379 "
        "--num-workers 4 --gpus-per-worker 1\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True, help="search-space YAML file or shipped space name (psvit family)")
    p.add_argument("--data", default="digits", help=DATA_HELP)
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="total epochs (default %(default)s)")
    p.add_argument("--workspace", default="vitnas-runs", help="where the checkpoint goes (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random stream (default %(default)s)")
    p.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size,
        help="global batch: per-process micro-batch x processes x --accum-steps (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--aug", default=d.aug, help="augmentation preset: none, light or deit (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in the workspace (same settings)")
    p.add_argument("--force", action="store_true", help="start over even if the workspace holds a checkpoint")
    p.add_argument("--tracking-uri", help="log the run to MLflow here (default: $MLFLOW_TRACKING_URI if set, else no logging)")
    _runtime_options(p, plain=False)
    levers = p.add_argument_group(
        "sandwich levers (their effect on ranking trust: benchmarks/results/supernet_ranking.json; "
        "measure yours with vitnas rank-check)"
    )
    levers.add_argument(
        "--random-subnets", type=nonnegative_int, default=d.random_subnets,
        help="random subnets per step besides the largest and smallest (default %(default)s)",
    )  # fmt: skip
    levers.add_argument(
        "--sampling", default=d.sampling,
        help="uniform: each choice drawn afresh; fair: each choice's options dealt from a shuffled deck, "
        "trained equally often (FairNAS) (default %(default)s)",
    )  # fmt: skip
    levers.add_argument(
        "--distill", default=d.distill,
        help="largest: smaller subnets learn from the largest's predictions too (in-place distillation); "
        "none: labels only (default %(default)s)",
    )  # fmt: skip
    levers.add_argument(
        "--progressive-epochs", type=nonnegative_float, default=d.progressive_epochs, metavar="N",
        help="progressive shrinking: over the first N epochs the size choices open from the largest down "
        "(default %(default)s: off)",
    )  # fmt: skip
    levers.add_argument(
        "--pin", default=d.pin, metavar="CHOICE=KIND",
        help="train one few-shot sub-supernet: only subnets with this kind, e.g. s1.pool=tome (default: all)",
    )  # fmt: skip
    ray = p.add_argument_group("Ray cluster (--backend ray)")
    ray.add_argument(
        "--backend", default="local",
        help="local: this process, or torchrun's processes (default); ray: Ray Train workers",
    )  # fmt: skip
    ray.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a local Ray)")
    ray.add_argument("--num-workers", type=positive_int, default=2, help="Ray Train workers (default %(default)s)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker asks for (default %(default)s)")
    ray.add_argument(
        "--max-failures", type=nonnegative_int, default=3,
        help="worker failures survived, each resuming from the last checkpoint (default %(default)s)",
    )  # fmt: skip
    _quiet_option(p)
    p.set_defaults(run=_train_supernet)


def _train_supernet(args) -> int:
    from nas.supernet.train import train_supernet
    from nas.training.config import TrainConfig

    config = TrainConfig(
        epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr, aug=args.aug, **_runtime(args),
        random_subnets=args.random_subnets, sampling=args.sampling, distill=args.distill,
        progressive_epochs=args.progressive_epochs, pin=args.pin,
    )  # fmt: skip
    common = dict(resume=args.resume, force=args.force, tracking_uri=args.tracking_uri, progress=not args.quiet)
    if args.backend == "ray":
        from nas.training.ray_train import RayTrainOptions, train_supernet_on_ray

        options = RayTrainOptions(args.address, args.num_workers, args.gpus_per_worker, args.max_failures)
        result = train_supernet_on_ray(args.space, args.data, args.workspace, config, options, **common)
    elif args.backend == "local":
        result = train_supernet(args.space, args.data, args.workspace, config, device=args.device, **common)
    else:
        raise UserError(f"--backend {args.backend!r}: expected local or ray")
    if result.run_id:
        print(f"MLflow run {result.run_id}")
    return 0


# -- vitnas rank-check ------------------------------------------------------------------------------
RANK_CHECK_EPILOG = """\
what it does:
  1. picks subnets spread over the space: evenly over FLOPs, covering every attention, pooling and
     reduction kind (seeded: --pick-seed), or the Pareto fronts of --campaign NAME
  2. trains each from scratch --seeds times through the training loop; with in-memory data (digits)
     run r trains on 4/5 of the train+validation pool and is tested on the other fifth (fold r mod
     --folds), so more images score each subnet; the test split is never used
  3. scores each with the weights it inherits from the supernet on the validation split, as search does
  4. reports Kendall tau, Spearman rho and top-k overlap with bootstrap intervals (over subnets, seeds
     and test images) and writes them into the checkpoint's sidecar and MLflow, where vitnas search,
     vitnas pareto and the dashboard show them

Every finished stand-alone run is cached under WORKSPACE/rank-check/standalone/ by (architecture, data,
held-out part, recipe, seed): run the same command again to resume, and a check of another supernet of
the same space reuses the runs.

examples:
  vitnas rank-check --supernet vitnas-runs/supernet/psvit-digits --subnets 8 --epochs 10
  vitnas rank-check --supernet CKPT --subnets 20 --epochs 25 --seeds 2        # the benchmark's setting
  vitnas rank-check --supernet CKPT --campaign digits-cpu                   # the front you searched
  torchrun --standalone --nproc_per_node 8 -m nas rank-check --supernet CKPT --device cuda
"""


def _rank_check_command(sub) -> None:
    p = sub.add_parser(
        "rank-check",
        help="measure how well a supernet ranks subnets (train some from scratch and compare)",
        description="How far can you trust a search on this supernet? Trains a spread of subnets from scratch "
        "and compares their accuracy with the accuracy their inherited weights give: the agreement of the two "
        "rankings, with 90 % bootstrap intervals.",
        epilog=RANK_CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--supernet", required=True, action="append", metavar="CKPT",
        help="the supernet checkpoint (its folder, supernet.json or supernet.safetensors); repeat it for the "
        "sub-supernets of a few-shot split (each trained with a pin)",
    )  # fmt: skip
    p.add_argument("--subnets", type=_whole(3), default=20, help="subnets compared (default %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=25, help="stand-alone training epochs (default %(default)s)")
    p.add_argument(
        "--seeds", type=positive_int, default=2,
        help="stand-alone runs per subnet, averaged; each has its own seed and held-out fold (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--data", help="data spec (default: the data the supernet was trained on)")
    p.add_argument(
        "--holdout", default="auto", choices=("auto", "cv", "val"),
        help="where stand-alone runs are tested: cv (folds of train+validation), val (train on train, test on "
        "validation) or auto: cv for in-memory data, val for data on disk (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--folds", type=_whole(2), default=5, help="cross-validation folds (default %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=5, help="k of the top-k overlap (default %(default)s)")
    p.add_argument(
        "--campaign", action="append", default=[], metavar="NAME",
        help="compare the Pareto-front trials of this campaign instead of a spread (repeatable)",
    )  # fmt: skip
    p.add_argument("--pick-seed", type=int, default=0, help="seed of the spread of subnets (default %(default)s)")
    p.add_argument("--pool", type=positive_int, help="random members the spread is picked from (default: 6 per subnet)")
    p.add_argument(
        "--workers", type=nonnegative_int, default=0,
        help="CPU only: stand-alone runs side by side, each a process with its share of the threads "
        "(default 0: one per core, up to 4)",
    )  # fmt: skip
    p.add_argument(
        "--workspace",
        help="where the stand-alone cache and the MLflow store are (default: the checkpoint's workspace)",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the workspace's sqlite file)")
    p.add_argument("--cache", help="folder of cached stand-alone runs (default WORKSPACE/rank-check/standalone)")
    p.add_argument(
        "--device", default="auto",
        help="auto (CUDA when present), cpu, cuda or cuda:N; under torchrun each process takes its GPU",
    )  # fmt: skip
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (CUDA) (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    _quiet_option(p)
    p.set_defaults(run=_rank_check)


def _rank_check(args) -> int:
    from nas.ranking.check import RankCheckConfig, format_result, format_subnets, rank_check

    config = RankCheckConfig(
        subnets=args.subnets, epochs=args.epochs, seeds=args.seeds, holdout=args.holdout, folds=args.folds,
        pick_seed=args.pick_seed, pool=args.pool, top_k=args.top_k, campaigns=tuple(args.campaign), data=args.data,
        workers=args.workers, device=args.device, precision=args.precision,
    )  # fmt: skip
    result = rank_check(
        args.supernet if len(args.supernet) > 1 else args.supernet[0], config, workspace=args.workspace,
        tracking_uri=args.tracking_uri, cache=args.cache, progress=not args.quiet,
        log=(lambda line: print(line, file=sys.stderr)) if args.json else print,  # stdout: the JSON alone
    )  # fmt: skip
    if result is None:  # a torchrun process other than rank 0
        return 0
    if args.json:
        print(json.dumps(result.ranking, indent=2))
        return 0
    print(format_subnets(result.ranking))
    print(format_result(result.ranking))
    print(
        f"{result.trained_now} stand-alone run(s) trained now, {result.reused} reused; {result.wall_s:.0f} s. "
        f"Written to {', '.join(map(str, result.sidecars))} and MLflow run {result.run_id}"
    )
    return 0


COMMANDS: list[Callable] = [  # in the order a user meets them
    _space_commands,
    _train_supernet_command,
    _rank_check_command,
    _finetune_command,
    _search_command,
    _pareto_command,
    _export_command,
    _train_command,
    _profile_command,
    _latency_table_command,
    _dashboard_command,
    _demo_command,
]


if __name__ == "__main__":
    sys.exit(main())
