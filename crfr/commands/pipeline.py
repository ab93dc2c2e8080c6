"""``crfr pipeline compile|submit|local|prefect``: the orchestrated ways to run the DAG."""

from __future__ import annotations

import argparse
import json
import sys

from crfr.cli import add_params_args, positive_int

DEFAULT_YAML = "pipeline/crfr_pipeline.yaml"


def register(sub) -> None:
    pipe = sub.add_parser("pipeline", help="compile, submit or run the Kubeflow pipeline; run the Prefect flow",
                          description="The same six steps as dvc.yaml, orchestrated by Kubeflow or Prefect.")
    actions = pipe.add_subparsers(dest="action", metavar="ACTION", required=True)

    comp = actions.add_parser("compile", help="write the kfp v2 pipeline YAML (deterministic)",
                              description="Compile the pipeline for the params (e.g. --set profile=paper).")
    add_params_args(comp)
    comp.add_argument("--out", default=DEFAULT_YAML, help="YAML to write (default: %(default)s)")
    comp.set_defaults(func=_compile)

    sub_ = actions.add_parser(
        "submit", help="compile and start a run on a Kubeflow Pipelines endpoint (optionally wait for it)",
        description="Compile and submit with kfp.Client. Auth from the environment, never printed: "
                    "KF_PIPELINES_TOKEN (bearer token), KF_PIPELINES_COOKIES (Cookie header of a logged-in "
                    "session), KF_PIPELINES_SA_TOKEN_PATH (service-account token file); else kfp's defaults. "
                    "With --wait the exit code is the run's: 0 succeeded, 1 failed/canceled/skipped, "
                    "124 still running at --timeout.")
    add_params_args(sub_)
    sub_.add_argument("--host", default=None,
                      help="Kubeflow Pipelines API URL, e.g. http://ml-pipeline-ui:80 "
                           "(default: $KF_PIPELINES_ENDPOINT)")
    sub_.add_argument("--experiment", default="crfr", help="kfp experiment (default: %(default)s)")
    sub_.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    sub_.add_argument("--run-name", default=None)
    sub_.add_argument("--source", default=None, help="raw dataset URI (default: params kubeflow.data_uri)")
    sub_.add_argument("--package", default="outputs/crfr_pipeline.yaml", help="compiled YAML (default: %(default)s)")
    sub_.add_argument("--wait", action="store_true", help="wait for the run to end; exit non-zero unless it succeeded")
    sub_.add_argument("--timeout", type=positive_int, default=7 * 24 * 3600, metavar="SECONDS",
                      help="--wait: give up after this long (default: a week)")
    sub_.add_argument("--poll", type=positive_int, default=30, metavar="SECONDS",
                      help="--wait: seconds between state checks (default: %(default)s)")
    sub_.set_defaults(func=_submit)

    pre = actions.add_parser(
        "preflight", help="check, here, what a cluster run's first task checks: tracking, S3, params, inputs",
        description="Fail closed before a submit: MLFLOW_TRACKING_URI must name a shared MLflow server (not a "
                    "sqlite/file store, which lives and dies with a pod), s3:// paths need AWS credentials and "
                    "AWS_ENDPOINT_URL or AWS_DEFAULT_REGION, every step's params must be valid and the input "
                    "data must exist. In a pod these come from the ConfigMap crfr-settings and the Secret crfr-s3. "
                    "Exit 0: the run would start; 2: the one line printed names what is missing.")
    add_params_args(pre)
    pre.add_argument("--source", default=None, help="raw dataset URI (default: params kubeflow.data_uri)")
    pre.set_defaults(func=_preflight)

    loc = actions.add_parser(
        "local", help="run the kfp pipeline on this machine with kfp.local (in this environment or in containers)",
        description="kfp.local runs the pipeline on this machine. --runner subprocess: every task in this "
                    "environment. --runner docker: every task in its image (kubeflow.image / gpu_image, built by "
                    "docker/build-cpu-image.sh; never pulled) as a pod runs it: uid 10001, read-only root, no "
                    "capabilities, host network only; tracking and S3 settings and credentials are passed from "
                    "this environment (MLFLOW_TRACKING_URI, AWS_*), and the run fails closed like a cluster run.")
    add_params_args(loc)
    loc.add_argument("--source", required=True, help="raw dataset (LFW root) or s3:// URI")
    loc.add_argument("--root", default="outputs/kfp-local", help="local pipeline root (default: %(default)s)")
    loc.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                     help="where tasks run (default: %(default)s)")
    loc.set_defaults(func=_local)

    pf = actions.add_parser("prefect", help="run the Prefect flow locally",
                            description="Prefect 3 flow with retries and input-based caching.")
    add_params_args(pf)
    pf.add_argument("--workdir", default="outputs/prefect", help="outputs (default: %(default)s)")
    pf.add_argument("--source", default=None, help="raw dataset (default: params data.root)")
    pf.add_argument("--results", default=None,
                    help="where task results persist: a folder or s3:// prefix (default: Prefect's local storage)")
    pf.add_argument("--checkpoints", default=None,
                    help="s3:// prefix training checkpoints are mirrored to, per flow run, so a retry resumes "
                         "(default: params runtime.checkpoint_uri)")
    pf.set_defaults(func=_prefect)


def _compile(args: argparse.Namespace) -> int:
    from crfr.config import load_params
    from pipeline.kfp_pipeline import compile_pipeline

    print(compile_pipeline(load_params(args.params, args.overrides), args.out))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from crfr.config import load_params
    from pipeline.submit import exit_code, submit, wait

    client, run_id = submit(load_params(args.params, args.overrides), args.host, args.experiment, args.run_name,
                            args.namespace, args.package, args.source)
    print(f"submitted run {run_id}", flush=True)
    if not args.wait:
        return 0
    state = wait(client, run_id, args.timeout, args.poll, on_state=lambda s: print(f"run {run_id}: {s}", flush=True),
                 host=args.host or "")
    code = exit_code(state)
    if code:
        ended = f"ended {state}" if code != 124 else f"is still {state} after --timeout {args.timeout} s"
        print(f"crfr: run {run_id} {ended}", file=sys.stderr)
    return code


def _preflight(args: argparse.Namespace) -> int:
    from crfr.config import load_params
    from pipeline.kfp_pipeline import preflight

    found = preflight(load_params(args.params, args.overrides), args.source)
    print(f"preflight ok: tracking and storage settings, every step's params, inputs found: {', '.join(found)}")
    return 0


def _local(args: argparse.Namespace) -> int:
    from crfr.config import load_params
    from pipeline.kfp_pipeline import run_local

    run_local(load_params(args.params, args.overrides), args.source, args.root, args.runner)
    print(f"kfp.local run ({args.runner}) finished; outputs under {args.root}")
    return 0


def _prefect(args: argparse.Namespace) -> int:
    from crfr.config import load_params
    from pipeline.prefect_flow import run_flow

    print(json.dumps(run_flow(load_params(args.params, args.overrides), args.workdir, args.source, args.results,
                              args.checkpoints), indent=2, default=str))
    return 0
