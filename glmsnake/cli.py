"""The `glmsnake` command: render the recipe, review the plan, run steps, set up profiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glmsnake.errors import GlmsnakeError

# Commands whose module owns its own argument parser: `glmsnake NAME ARGS...` -> module.main(ARGS).
DELEGATED = {
    "convert-fp8": "glmsnake.convert.fp8",
}


def _workflow(args: argparse.Namespace):
    from glmsnake import resolve

    path = resolve.find_config(args.configfile)
    if args.configfile is None:
        print(f"# config: {path.resolve()} (--configfile PATH picks another)", file=sys.stderr)
    extra = {"preset": args.preset} if getattr(args, "preset", None) else {}
    return resolve.load_file(path, extra)


def cmd_render(args: argparse.Namespace) -> int:
    from glmsnake.recipe import render_text

    from glmsnake.resolve import refuse_over_budget

    wf = _workflow(args)
    refuse_over_budget(wf)  # the command it prints would not fit either
    runs = [args.run] if args.run else list(wf.runs)
    for run in runs:
        if run not in wf.runs:
            raise GlmsnakeError(f"no run named {run!r}", f"choose one of {sorted(wf.runs)}")
        print(f"# run: {run}  (preset {wf.user.preset})")
        print(render_text(wf, run))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from glmsnake import resolve
    from glmsnake.plan import plan, print_plan

    if args.resources or args.explain:
        from glmsnake.resources.report import print_resources

        wf = _workflow(args)
        if args.run and args.run not in wf.runs:
            raise GlmsnakeError(f"no run named {args.run!r}", f"choose one of {sorted(wf.runs)}")
        return print_resources(wf, args.run, args.explain)
    print_plan(plan(args.targets, resolve.find_config(args.configfile), args.snakemake_args))
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    import inspect

    from glmsnake import steps
    from glmsnake.resolve import from_env

    if args.step not in steps.STEPS:
        raise GlmsnakeError(f"no step named {args.step!r}", f"choose one of {sorted(steps.STEPS)}")
    options = {k: v for k in ("sentinel", "output", "run", "name") if (v := getattr(args, k)) is not None}
    params = list(inspect.signature(steps.step_function(args.step)).parameters.values())[1:]
    missing = [p.name for p in params if p.default is p.empty and p.name not in options]
    if missing:
        raise GlmsnakeError(f"step {args.step} needs {', '.join('--' + m for m in missing)}",
                            "the rules pass them; run steps through snakemake")
    wf, config_line = from_env()
    steps.run(args.step, wf, config_line, **options)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from glmsnake.verify import verify

    return verify(_workflow(args), args.target)


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from glmsnake.resolve import user_config_schema

    print(json.dumps(user_config_schema(), indent=2))
    return 0


def cmd_setup_profiles(args: argparse.Namespace) -> int:
    from glmsnake.profiles import install_profiles

    for link in install_profiles(Path(args.dest) if args.dest else None):
        print(f"profile {link.name}: {link} -> {link.resolve()}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from glmsnake.status import show_status

    return show_status(_workflow(args), args.run, args.watch)


def cmd_preflight(args: argparse.Namespace) -> int:
    from glmsnake.check_cluster import check_cluster

    return check_cluster(_workflow(args), args.run, args.nodes)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value < 0.1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds of at least 0.1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmsnake", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    config_help = "the user config (default: ./config/config.yaml, else the repository's)"

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--configfile", type=Path, help=config_help)
        sp.add_argument("--preset", help="use this preset instead of the config's")
        return sp

    r = with_config(sub.add_parser("render", help="print slime's argument groups, driver command and env"))
    r.add_argument("--run", help="one run (default: all)")
    r.set_defaults(func=cmd_render)

    pl = sub.add_parser("plan", help="per step: nodes x GPUs, outputs, what it needs, whether and why it runs")
    pl.add_argument("targets", nargs="*", default=["train"])
    pl.add_argument("--configfile", type=Path, help=config_help)
    pl.add_argument("--resources", action="store_true",
                    help="will it fit: GPU memory per pipeline stage, rollout, host memory, disk, conversion time")
    pl.add_argument("--explain", action="store_true", help="with --resources: every term with its inputs")
    pl.add_argument("--run", help="with --resources: one run (default: all)")
    pl.add_argument("--preset", help="with --resources: use this preset instead of the config's")
    pl.add_argument("--snakemake-args", nargs=argparse.REMAINDER, default=[], help="passed on to snakemake")
    pl.set_defaults(func=cmd_plan)

    s = sub.add_parser("step", help="run one workflow step (used by the rules)")
    s.add_argument("step", help="the rule's step, e.g. train (the rules name it)")
    s.add_argument("--sentinel", type=Path, help="the rule's sentinel, written last")
    s.add_argument("--output", type=Path, help="the rule's output file (download-dataset)")
    s.add_argument("--run")
    s.add_argument("--name")
    s.set_defaults(func=cmd_step)

    st = with_config(sub.add_parser("status", help="every run: progress, last reward, checkpoints, Slurm job"))
    st.add_argument("run", nargs="?")
    st.add_argument("--watch", type=_seconds, nargs="?", const=10.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (default 10) until Ctrl-C")
    st.set_defaults(func=cmd_status)

    v = with_config(sub.add_parser("verify", help="re-hash every output against its sentinel; name what differs"))
    v.add_argument("target", nargs="?", help="weights, torch_dist, fp8, train or export (default: all)")
    v.set_defaults(func=cmd_verify)

    pf = with_config(sub.add_parser("preflight", help="check a fresh allocation's nodes (GPUs, versions, storage)"))
    pf.add_argument("--run", help="whose training allocation to check (default: the first run)")
    pf.add_argument("--nodes", type=int, help="check this many nodes instead of the allocation's")
    pf.set_defaults(func=cmd_preflight)
    sc = sub.add_parser("schema", help="print the JSON schema of config/config.yaml")
    sc.set_defaults(func=cmd_schema)

    sp = sub.add_parser("setup-profiles", help="make `snakemake --profile slurm|local` find this repo's profiles")
    sp.add_argument("--dest", help="profile folder (default: ~/.config/snakemake)")
    sp.set_defaults(func=cmd_setup_profiles)

    for name in DELEGATED:
        sub.add_parser(name, help=f"see `glmsnake {name} --help`", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in DELEGATED:
            import importlib

            return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except GlmsnakeError as e:
        print(f"glmsnake: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
