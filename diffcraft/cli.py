"""The `diffcraft` command. Holds no logic of its own: it parses, calls the library, prints."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from diffcraft.errors import DiffcraftError
from diffcraft.train.provenance import COMMAND_ENV


def _cmd_synth(args) -> None:
    from diffcraft.data.synthetic import write_dataset

    out = write_dataset(args.out, args.songs, args.stems, args.seconds, args.seed)
    print(f"wrote {args.songs * args.stems} synthetic stems ({args.seconds:.0f} s each) to {out}")


def _prepare_config(args):
    from diffcraft.data.prepare import PrepareConfig

    return PrepareConfig(crepe_model=args.crepe_model, silence_db=args.silence_db,
                         validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
                         split_seed=args.split_seed, split_file=args.split_file)


def _cmd_prepare(args) -> None:
    from diffcraft.data.prepare import prepare

    summary = prepare(args.source, args.out, _prepare_config(args), address=args.address,
                      stems=args.stems, instruments=args.instruments, metadata_dir=args.metadata)
    print("\n".join(summary.lines()))


def _cmd_train(args) -> None:
    from diffcraft.train.config import load_run_config
    from diffcraft.train.loop import train

    cfg = load_run_config(args.config, overrides=args.set)
    result = train(cfg, out_dir=args.out, progress=True)
    print(result.describe())


def _finish_study(study, outcome) -> None:
    """Print the status and how to look at it; exit non-zero unless every trial finished."""
    from diffcraft.study.status import status_lines

    print("\n".join(status_lines(study)))
    _print_mlflow_link(study)
    if outcome.interrupted:
        print(f"diffcraft: interrupted; continue with `diffcraft study resume {study.name} --storage {study.storage}`",
              file=sys.stderr)
        raise SystemExit(130)
    if outcome.failed:
        print(f"diffcraft: {outcome.failed} trial(s) failed (see `diffcraft study status {study.name}`)", file=sys.stderr)
        raise SystemExit(1)


def _print_mlflow_link(study) -> None:
    from diffcraft.study.record import StudyRecord
    from diffcraft.study.tracking import ui_link

    record = StudyRecord.started(study)
    if not record.tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow: mlflow ui --backend-store-uri {record.tracking_uri}")
    print(f"runs: {ui_link(record)}")


def _cmd_study_run(args) -> None:
    from diffcraft.study.runner import run_study
    from diffcraft.study.studyfile import load_study

    study = load_study(args.file, overrides=args.set)
    _finish_study(study, run_study(study, address=args.address, take_over=args.take_over))


def _stored_study(args):
    from diffcraft.study.record import stored_study

    return stored_study(args.name, args.storage)


def _cmd_study_resume(args) -> None:
    from diffcraft.study.runner import run_study

    study = _stored_study(args)
    _finish_study(study, run_study(study, address=args.address, resume=True, take_over=args.take_over,
                                   retry_failed=args.retry_failed))


def _cmd_study_status(args) -> None:
    from diffcraft.study.status import status_lines

    study = _stored_study(args)
    print("\n".join(status_lines(study)))
    _print_mlflow_link(study)


def _cmd_study_report(args) -> None:
    from diffcraft.study.report import write_report

    study = _stored_study(args)
    study.report.factorial = study.report.factorial or args.factorial
    path = write_report(study)
    print(path.read_text())
    print(f"report written to {path.parent} and logged to the study's MLflow parent run")


def _cmd_study_schema(args) -> None:
    import json

    from diffcraft.study.studyfile import file_schema

    text = json.dumps(file_schema(args.kind), indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"wrote the JSON Schema of a {args.kind} file to {args.out}")
    else:
        print(text, end="")


def _cmd_study_submit(args) -> None:
    from diffcraft.study.jobs import submit_study
    from diffcraft.study.studyfile import load_study

    job = submit_study(load_study(args.file, overrides=args.set), args.address)
    print(f"submitted {job}\n  follow: diffcraft study logs {job} --address {args.address} --follow"
          f"\n  stop:   diffcraft study stop {job} --address {args.address}")


def _cmd_study_logs(args) -> None:
    from diffcraft.study.jobs import job_logs, job_status

    print(job_logs(args.address, args.id, args.follow), end="")
    status = job_status(args.address, args.id)
    print(f"[{args.id}: {status}]")
    if status in ("FAILED", "STOPPED"):
        raise SystemExit(1)


def _cmd_study_stop(args) -> None:
    from diffcraft.study.jobs import stop_job

    print(f"{args.id}: " + ("stop requested" if stop_job(args.address, args.id) else "not running"))


def _cmd_cluster_check(args) -> None:
    from diffcraft.study.studyfile import load_study

    study = load_study(args.study, overrides=args.set)
    if args.address and args.address.startswith(("http://", "https://")):
        from diffcraft.study.jobs import job_logs, job_status, submit_command

        job = submit_command(args.address, ["cluster", "check", "--study", "study.yaml"], study, "diffcraft-check")
        print(f"running the check on the cluster as job {job}")
        job_logs(args.address, job, follow=True)
        if job_status(args.address, job) != "SUCCEEDED":
            raise SystemExit(1)
        return
    from diffcraft.model_uri import default_tracking_uri
    from diffcraft.raytools import forwarded_env, ray_session
    from diffcraft.study.preflight import preflight
    from diffcraft.study.tracking import require_server_for_cluster

    require_server_for_cluster(study.mlflow.tracking_uri, args.address)
    uri = default_tracking_uri(study.mlflow.tracking_uri)
    with ray_session(args.address, runtime_env={"env_vars": forwarded_env()}) as ray:
        report = preflight(study, uri, ray)
    for line in report.nodes + [f"note: {n}" for n in report.notes] + [f"PROBLEM: {p}" for p in report.problems]:
        print(line)
    print("cluster check: " + ("ok" if report.ok else f"{len(report.problems)} problem(s)"))
    if not report.ok:
        raise SystemExit(1)


def _cmd_promote(args) -> None:
    from diffcraft.study.promote import promote
    from diffcraft.study.record import StudyRecord, stored_study

    study = stored_study(args.study, args.storage)
    p = promote(study, metric=args.metric, mode=args.mode, alias=args.alias, where=args.where,
                name=args.name, trial=args.trial)
    print(f"promoted trial {p.trial} ({p.metric} = {p.value:.6g}, re-measured {p.reproduced:.6g}) as "
          f"{p.name} version {p.version}; models:/{p.name}@{p.alias} now points to it")
    print(f"serve it: MLFLOW_TRACKING_URI={StudyRecord.started(study).tracking_uri} mlflow models serve "
          f"-m models:/{p.name}@{p.alias} --env-manager local -p 5001")


def _cmd_transfer(args) -> None:
    from diffcraft.model_uri import default_tracking_uri, resolve_checkpoint
    from diffcraft.train.checkpoint import model_from_checkpoint
    from diffcraft.transfer import transfer_files

    model, _ = model_from_checkpoint(resolve_checkpoint(args.model, default_tracking_uri(args.tracking_uri or "")))
    done, errors = transfer_files(args.inputs, model, args.out, args.f0, args.pitch_shift, args.loudness_offset,
                                  args.crepe_model, args.plot)
    print("\n".join(done))
    for error in errors:
        print(f"diffcraft: skipped {error}", file=sys.stderr)
    if errors and not done:
        raise SystemExit(1)


def _cmd_figures(args) -> None:
    import re
    import tempfile

    from diffcraft.data.dataset import ClipDataset
    from diffcraft.errors import ConfigError, DataError
    from diffcraft.figures import latent_figures
    from diffcraft.model_uri import default_tracking_uri, resolve_source
    from diffcraft.train.checkpoint import model_from_checkpoint

    tracking_uri = default_tracking_uri(args.tracking_uri or "")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, run_id = resolve_source(args.source, tracking_uri, Path(tmp))
        model, cfg = model_from_checkpoint(checkpoint)
    if model.encoder is None:
        raise ConfigError(f"{args.source}: a {cfg.model.stage}-stage model has no encoder, so no latent figures")
    cache = args.cache or cfg.data.cache
    out = args.out or Path("figures-" + re.sub(r"[^\w.@-]+", "_", args.source.split(":/", 1)[-1]).strip("_."))
    try:
        paths = latent_figures(model, ClipDataset(cache, args.split), out)
    except DataError as err:
        raise DataError(f"{args.source}, {args.split} split of cache {cache}: {err} "
                        "(--cache, --split pick others)") from None
    print("\n".join(f"wrote {path}" for path in paths))
    if run_id:
        from diffcraft.model_uri import tracking_client

        client = tracking_client(tracking_uri)
        for path in paths:
            client.log_artifact(run_id, str(path), "figures")
        print(f"logged to run {run_id} under figures/ (MLflow {tracking_uri})")


def _cmd_quickstart(args) -> None:
    from diffcraft.quickstart import quickstart

    quickstart(Path(args.workdir))


def _add_data(sub) -> None:
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
    prep.add_argument("source", help="MDB-stem-synth root or a folder of audio files (a folder or s3://, gs://)")
    prep.add_argument("--out", required=True, help="cache: a folder, or s3://bucket/prefix, gs://...")
    prep.add_argument("--crepe-model", default="full", choices=["full", "tiny"])
    prep.add_argument("--silence-db", type=float, default=-60.0)
    prep.add_argument("--validation-fraction", type=float, default=0.2, help="share of songs that pick the best epoch")
    prep.add_argument("--test-fraction", type=float, default=0.2, help="share of songs held out for reported numbers")
    prep.add_argument("--split-seed", type=int, default=0, help="which songs the fractions pick")
    prep.add_argument("--split-file", default="", help="YAML/JSON train:/validation:/test: song lists (instead "
                                                       "of the fractions)")
    prep.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    prep.add_argument("--stems", nargs="*", default=None, help="MDB track ids to use")
    prep.add_argument("--instruments", nargs="*", default=None, help="MedleyDB instruments to use")
    prep.add_argument("--metadata", type=Path, default=None, help="MedleyDB metadata folder")
    prep.set_defaults(func=_cmd_prepare)


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="one training run from a YAML run config")
    train.add_argument("config", type=Path)
    train.add_argument("--out", type=Path, default=None, help="run folder (default: from the config)")
    train.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                       help="override config fields, e.g. train.epochs=3 model.decoder.core=bimamba")
    train.set_defaults(func=_cmd_train)


def _add_study(sub, ray_address: str | None) -> None:
    study = sub.add_parser("study", help="hyperparameter and ablation studies on Ray Tune").add_subparsers(
        dest="study_command", required=True)
    run = study.add_parser("run", help="validate and run a study file (the same file again: continue it)")
    run.add_argument("file", type=Path)
    run.add_argument("--address", default=ray_address,
                     help="Ray cluster: auto, HOST:6379 (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override study fields")
    run.add_argument("--take-over", action="store_true", help="take the study from a driver whose lease is stale")
    run.set_defaults(func=_cmd_study_run)
    for name, func, text in (("resume", _cmd_study_resume, "continue a study after a kill"),
                             ("status", _cmd_study_status, "trials, their states and the best so far"),
                             ("report", _cmd_study_report, "the results table, logged to MLflow")):
        cmd = study.add_parser(name, help=text)
        cmd.add_argument("name")
        cmd.add_argument("--storage", default="studies", help="the study file's storage (a folder or s3://, gs://)")
        if name == "resume":
            cmd.add_argument("--address", default=ray_address)
            cmd.add_argument("--take-over", action="store_true", help="take the study from a driver whose lease is stale")
            cmd.add_argument("--retry-failed", action="store_true",
                             help="run the trials that failed (after their max_retries) again")
        if name == "report":
            cmd.add_argument("--factorial", action="store_true",
                             help="main effects and interaction of two searched dimensions (automatic for a grid)")
        cmd.set_defaults(func=func)
    schema = study.add_parser("schema", help="the JSON Schema of study (or run) files, for editors")
    schema.add_argument("--kind", default="study", choices=["study", "run"])
    schema.add_argument("--out", type=Path, default=None, help="write it here (default: print it)")
    schema.set_defaults(func=_cmd_study_schema)
    _add_jobs(study)


def _add_jobs(study) -> None:
    """`study submit`, `study logs`, `study stop`: studies as Ray Jobs on a cluster."""
    submit = study.add_parser("submit", help="run a study on a Ray cluster as a Ray Job")
    submit.add_argument("file", type=Path)
    submit.add_argument("--address", required=True, help="the cluster's Jobs API, e.g. http://HEAD:8265")
    submit.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    submit.set_defaults(func=_cmd_study_submit)
    for name, func, text in (("logs", _cmd_study_logs, "a submitted study's driver log"),
                             ("stop", _cmd_study_stop, "stop a submitted study (resume it later)")):
        cmd = study.add_parser(name, help=text)
        cmd.add_argument("id", help="the submission id `study submit` printed")
        cmd.add_argument("--address", required=True, help="http://HEAD:8265")
        if name == "logs":
            cmd.add_argument("--follow", action="store_true")
        cmd.set_defaults(func=func)


def _add_cluster(sub, ray_address: str | None) -> None:
    cluster = sub.add_parser("cluster", help="check a Ray cluster before running studies on it").add_subparsers(
        dest="cluster_command", required=True)
    check = cluster.add_parser("check", help="can every node read the cache, write the storage, reach MLflow?")
    check.add_argument("--study", required=True, type=Path, help="the study file whose storage, cache and MLflow to check")
    check.add_argument("--address", default=ray_address, help="http://HEAD:8265 (runs as a job), auto or HOST:6379")
    check.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    check.set_defaults(func=_cmd_cluster_check)


def _add_promote(sub) -> None:
    prom = sub.add_parser("promote", help="register a study's best finished trial in the MLflow registry")
    prom.add_argument("study", metavar="STUDY")
    prom.add_argument("--storage", default="studies", help="the study's storage (a folder or s3://, gs://)")
    prom.add_argument("--metric", default=None, help="default: the study objective")
    prom.add_argument("--mode", default=None, choices=["min", "max"])
    prom.add_argument("--alias", default="champion")
    prom.add_argument("--where", action="append", default=[], metavar="'METRIC OP VALUE'",
                      help="constraint at the trial's best epoch, e.g. 'active_units >= 4' (repeatable)")
    prom.add_argument("--name", default=None, help="registered model name (default: diffcraft-STUDY)")
    prom.add_argument("--trial", default=None, help="promote this trial (id or name) instead of the best")
    prom.set_defaults(func=_cmd_promote)


def _add_models(sub) -> None:
    """`transfer` and `figures`: what a trained model does and holds."""
    tr = sub.add_parser("transfer", help="timbre transfer of audio files with a trained model")
    tr.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    tr.add_argument("--model", required=True,
                    help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow Model folder or a checkpoint")
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--pitch-shift", type=float, default=0.0, help="semitones")
    tr.add_argument("--loudness-offset", type=float, default=0.0, help="dB")
    tr.add_argument("--f0", default="auto", choices=["auto", "encoder", "crepe"])
    tr.add_argument("--crepe-model", default="full", choices=["full", "tiny"])
    tr.add_argument("--plot", action="store_true", help="also write input/output spectrograms with the F0 used")
    tr.add_argument("--tracking-uri", default=None, help="MLflow URI for models:/ (default: ./mlflow.db)")
    tr.set_defaults(func=_cmd_transfer)

    fig = sub.add_parser("figures", help="latent t-SNE and interpolation figures of a model with an encoder")
    fig.add_argument("source", metavar="SOURCE",
                     help="an MLflow run id (its checkpoint/best.pt; the figures are also logged to it), "
                          "models:/NAME@ALIAS, runs:/ID/PATH, an MLflow Model folder or a checkpoint")
    fig.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: figures-SOURCE)")
    fig.add_argument("--cache", default=None, help="feature cache of the clips (default: the run config's data.cache)")
    fig.add_argument("--split", default="validation", choices=["validation", "train", "test"])
    fig.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or None,
                     help="MLflow URI for run ids and models:/ (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    fig.set_defaults(func=_cmd_figures)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcraft", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    ray_address = os.environ.get("RAY_ADDRESS") or None
    _add_data(sub)
    _add_train(sub)
    _add_study(sub, ray_address)
    _add_cluster(sub, ray_address)
    _add_promote(sub)
    _add_models(sub)
    quick = sub.add_parser("quickstart", help="synthetic data -> cache -> the quickstart study -> report")
    quick.add_argument("--workdir", default="diffcraft-quickstart")
    quick.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ[COMMAND_ENV] = shlex.join(["diffcraft", *(sys.argv[1:] if argv is None else argv)])  # runs record it
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
