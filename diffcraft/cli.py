"""The `diffcraft` command. Holds no logic of its own: it parses, calls the library, prints."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffcraft.errors import DiffcraftError


def _cmd_synth(args) -> None:
    from diffcraft.data.synthetic import write_dataset

    out = write_dataset(args.out, args.songs, args.stems, args.seconds, args.seed)
    print(f"wrote {args.songs * args.stems} synthetic stems ({args.seconds:.0f} s each) to {out}")


def _prepare_config(args):
    from diffcraft.data.prepare import PrepareConfig

    return PrepareConfig(crepe_model=args.crepe_model, silence_db=args.silence_db,
                         validation_fraction=args.validation_fraction)


def _cmd_prepare(args) -> None:
    from diffcraft.data.prepare import prepare

    summary = prepare(args.source, args.out, _prepare_config(args), address=args.address,
                      stems=args.stems, instruments=args.instruments, metadata_dir=args.metadata)
    print("\n".join(summary.lines()))


def _cmd_train(args) -> None:
    from diffcraft.train.loop import load_run_config, train

    cfg = load_run_config(args.config, overrides=args.set)
    result = train(cfg, out_dir=args.out, progress=True)
    print(result.describe())


def _cmd_quickstart(args) -> None:
    from diffcraft.quickstart import quickstart

    quickstart(Path(args.workdir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcraft", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets and the feature cache").add_subparsers(
        dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic violin-like stems (MDB-stem-synth layout)")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--songs", type=int, default=4)
    synth.add_argument("--stems", type=int, default=2, help="stems per song")
    synth.add_argument("--seconds", type=float, default=20.0)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_synth)

    prep = data.add_parser("prepare", help="build or update a feature cache from audio")
    prep.add_argument("source", type=Path, help="MDB-stem-synth root or a folder of audio files")
    prep.add_argument("--out", required=True, type=Path, help="cache folder")
    prep.add_argument("--crepe-model", default="full", choices=["full", "tiny"])
    prep.add_argument("--silence-db", type=float, default=-60.0)
    prep.add_argument("--validation-fraction", type=float, default=0.2)
    prep.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    prep.add_argument("--stems", nargs="*", default=None, help="MDB track ids to use")
    prep.add_argument("--instruments", nargs="*", default=None, help="MedleyDB instruments to use")
    prep.add_argument("--metadata", type=Path, default=None, help="MedleyDB metadata folder")
    prep.set_defaults(func=_cmd_prepare)

    train = sub.add_parser("train", help="one training run from a YAML run config")
    train.add_argument("config", type=Path)
    train.add_argument("--out", type=Path, default=None, help="run folder (default: from the config)")
    train.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                       help="override config fields, e.g. train.epochs=3 model.core=bimamba")
    train.set_defaults(func=_cmd_train)

    quick = sub.add_parser("quickstart", help="synthetic data -> cache -> a short training run")
    quick.add_argument("--workdir", default="diffcraft-quickstart")
    quick.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DiffcraftError as err:
        if args.debug:
            raise
        print(f"diffcraft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffcraft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
