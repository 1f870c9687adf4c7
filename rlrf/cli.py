"""Command line: `rlrf <stage> --recipe R [key.sub=value ...]` and the shared argument parser.

Every pipelines/<stage>.py script parses its arguments with `stage_args`, so the console script and
the scripts take the same flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import shutil
import sys
from pathlib import Path

from rlrf.config import ConfigError, Recipe, describe, load_recipe
from rlrf import runs
from rlrf.runs import script
from rlrf.errors import StageError
from rlrf.store import parse_shard



def stage_args(description: str, argv: list[str] | None = None, rounds: bool = True,
               shards: bool = False) -> tuple[Recipe, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides: key.sub=value, e.g. sample.n=4 dpo.beta=0.01 "
                                       "(`rlrf config --recipe R` lists every key)")
    p.add_argument("--recipe", default="recipes/ml100k_smollm2.yaml", help="YAML recipe (default: the CPU demo)")
    p.add_argument("--force", action="store_true", help="redo the stage from scratch even if its config changed")
    if rounds:
        p.add_argument("--round", type=int, default=1, help="RLRF round k (samples from generator k-1)")
    if shards:
        p.add_argument("--shard", default=None, help="run only slice i/n of the shards (Slurm arrays, Ray)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    # overrides may stand before, between and after the options (`run=x --round 2 sample.n=8`): plain parse_args
    # takes positionals from one run only and calls the rest "unrecognized arguments"
    args = p.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if shards:
            args.shard = parse_shard(args.shard)
    except (ConfigError, StageError) as e:
        p.exit(2, f"error: {e}\n")
    return recipe, args


def run_main(main) -> None:
    """Run a stage's main(); turn the errors a person must act on into one clear line and exit 2."""
    from rlrf.schema import SchemaError

    try:
        main()
    except (ConfigError, StageError, SchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the stage said how far it got and how to resume; no traceback
        sys.exit(130)


def verify_main(argv: list[str]) -> int:
    """`rlrf verify RUN`: RUN is a run directory or a run name under runs/; exit 1 when a file is bad."""
    from rlrf.inspect import resolve_run
    from rlrf.verify import verify_run

    p = argparse.ArgumentParser(prog="rlrf verify", description="check every finished stage of a run: each file's "
                                "size and sha256 against what the stage recorded, each parquet file readable")
    p.add_argument("run", help="runs/<run> or just <run>")
    args = p.parse_args(argv)
    try:
        ok = verify_run(resolve_run(args.run))
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("verify: every checked file is as its stage wrote it" if ok else
          "verify: some files are not as their stage wrote them (see above)")
    return 0 if ok else 1


def recipes_main(argv: list[str]) -> int:
    """`rlrf recipes`: the shipped recipes with their first comment line; `rlrf recipes cp NAME [DEST]` copies one."""
    from rlrf.config import ConfigError, find_recipe, shipped_recipes

    if not argv:
        for name, path in shipped_recipes().items():
            about = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
            print(f"{name:28s} {about}")
        print("\nrun one: rlrf <stage> --recipe NAME [key.sub=value ...]; copy one to edit: rlrf recipes cp NAME [DEST]")
        return 0
    if argv[0] != "cp" or len(argv) not in (2, 3):
        print("usage: rlrf recipes | rlrf recipes cp NAME [DEST]", file=sys.stderr)
        return 2
    try:
        src = find_recipe(argv[1])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dest = Path(argv[2]) if len(argv) == 3 else Path(src.name)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        print(f"error: {dest} exists; name another destination", file=sys.stderr)
        return 2
    shutil.copyfile(src, dest)
    print(f"copied {src.stem} to {dest}; run it with --recipe {dest}")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = runs.STAGES
    usage = ("usage: rlrf <command> [--recipe R] [key.sub=value ...]\n\n"
             f"stages:   {', '.join(stages)}\n"
             "others:   config (print the resolved recipe), inspect (pairs | profiles | summary),\n"
             "          verify RUN (hash every file of runs/RUN against its stage's checksums),\n"
             "          recipes (list the shipped recipes; `recipes cp NAME [DEST]` copies one to edit)\n")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "config":
        keys = "--keys" in rest
        recipe, _ = stage_args("print the resolved recipe (--keys: every key with its help)",
                               [a for a in rest if a != "--keys"], rounds=False)
        import yaml
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        if keys:
            for k, _, h in describe():
                print(f"{k:40s} {h}")
        return
    if cmd == "verify":
        sys.exit(verify_main(rest))
    if cmd == "recipes":
        sys.exit(recipes_main(rest))
    if cmd == "inspect":
        from rlrf.inspect import main as inspect_main
        inspect_main(rest)
        return
    if cmd not in stages:
        import difflib
        close = difflib.get_close_matches(cmd, (*stages, "config", "inspect", "verify", "recipes"), n=1)
        print(f"error: unknown command {cmd!r}" + (f"; did you mean {close[0]}?" if close else "") + "\n\n" + usage,
              file=sys.stderr)
        sys.exit(2)
    module = f"rlrf.pipelines.{script(cmd)}"  # the repo's pipelines/, shipped inside the package
    if importlib.util.find_spec(module) is None:  # a trainer registered without a script of its own
        from rlrf.trainers import main as trainer_main

        trainer_main(cmd, rest)
        return
    sys.argv = [f"rlrf {cmd}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
