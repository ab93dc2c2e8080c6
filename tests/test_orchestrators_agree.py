"""DVC, Kubeflow and Prefect run the same pipeline: for the same params, Table I rows included, each trains,
evaluates and registers the same models.

Each orchestrator is read the way it runs: DVC's own index of dvc.yaml (``foreach`` resolved against the
params) with every stage command parsed by its step's argument parser; the compiled Kubeflow pipeline spec,
following artifacts from producer to consumer (through the Table I loop); the Prefect flow run for real on
a temporary server, with the six step functions replaced by recorders (the flow's wiring is what is under
test, not the training). Models are named by their table row: ``teacher``, ``student``, or the row.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from argparse import ArgumentParser
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from crfr.config import load_params
from tests.pipeline_support import REPO

ROWS = ["resnet", "kd"]
# The steps that train, evaluate or register models.
MODEL_STEPS = ("components.train_teacher", "components.distill_student", "components.evaluate",
               "components.register")


@dataclass
class Plan:
    """What one orchestrator does with models, by table row name."""

    trained: set[str] = field(default_factory=set)
    evaluated: set[str] = field(default_factory=set)
    registered: set[str] = field(default_factory=set)


def row_name(row: str) -> str:
    return "student" if row == "default" else row


# ------------------------------------------------------------------------------------------------- DVC


def parse_step_args(module: str, argv: list[str]):
    """Parse a stage command's arguments with the step's own parser."""
    import importlib

    parser = ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    return parser.parse_args(argv)


def dvc_plan(tmp_path: Path, params_doc: dict) -> Plan:
    import networkx as nx
    from dvc.repo import Repo

    from components.evaluate import parse_model_args, table_rows

    root = tmp_path / "dvc"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params_doc, sort_keys=False))
    Repo.init(str(root), no_scm=True)
    params = load_params(root / "params.yaml")
    plan, producer, stage_of = Plan(), {}, {}
    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        graph = repo.index.graph
        for stage in stages:
            argv = shlex.split(stage.cmd)
            assert argv[:2] == ["scripts/python", "-m"], stage.cmd
            if argv[2] not in MODEL_STEPS:
                continue
            module, args = argv[2], parse_step_args(argv[2], argv[3:])
            stage_of[module] = stage_of.get(module, []) + [(stage, args)]
            if module == "components.train_teacher":
                producer[os.path.normpath(args.out)] = ("teacher", stage)
            elif module == "components.distill_student":
                producer[os.path.normpath(args.out)] = (row_name(args.row), stage)
        plan.trained = {name for name, _ in producer.values()}

        (evaluate, args), = stage_of["components.evaluate"]
        models = table_rows(args.models_dir, params) if args.models_dir else {}
        models.update(parse_model_args(args.model))
        deps = [d.def_path for d in evaluate.deps]
        for name, path in models.items():
            path = os.path.normpath(path)
            assert path in producer, f"DVC evaluates {path}, which no stage trains"
            trained_as, stage = producer[path]
            assert trained_as == name, f"DVC evaluates {path} as {name!r}, but it is row {trained_as!r}"
            assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps), f"evaluate misses {path}"
            assert nx.has_path(graph, evaluate, stage), f"evaluate does not run after {stage.addressing}"
            plan.evaluated.add(name)

        (register, args), = stage_of["components.register"]
        for path in filter(None, (args.model, args.teacher)):
            plan.registered.add(producer[os.path.normpath(path)][0])
    return plan


# ------------------------------------------------------------------------------------------- Kubeflow


def kfp_plan(tmp_path: Path, params) -> Plan:
    from pipeline.kfp_pipeline import compile_pipeline

    spec = next(yaml.safe_load_all(compile_pipeline(params, tmp_path / "kfp.yaml").read_text()))
    executors = spec["deploymentSpec"]["executors"]
    components = spec["components"]

    def function(task: dict) -> str | None:
        label = components[task["componentRef"]["name"]].get("executorLabel")
        args = executors[label]["container"]["args"] if label else []
        return args[args.index("--function_to_execute") + 1] if "--function_to_execute" in args else None

    def trained_by(task: dict, loop_items: list[str] | None) -> list[str]:
        """Row names a training task produces (every item of its loop, if it is in one)."""
        if function(task) == "train_teacher_op":
            return ["teacher"]
        row = task["inputs"]["parameters"]["row"]
        if "runtimeValue" in row:
            return [row_name(row["runtimeValue"]["constant"])]
        assert loop_items is not None, "a distill task whose row is neither a constant nor a loop item"
        return [row_name(item) for item in loop_items]

    root = spec["root"]["dag"]["tasks"]
    plan = Plan()
    outputs: dict[tuple[str, str], list[str]] = {}  # (root task, output key) -> row names
    for name, task in root.items():
        if function(task) in ("train_teacher_op", "distill_student_op"):
            names = trained_by(task, None)
            outputs[(name, "teacher" if names == ["teacher"] else "student")] = names
        elif "parameterIterator" in task:  # a dsl.ParallelFor: its body's models leave through the loop's outputs
            items = json.loads(task["parameterIterator"]["items"]["raw"])
            body = components[task["componentRef"]["name"]]["dag"]
            for key, out in body.get("outputs", {}).get("artifacts", {}).items():
                inner = body["tasks"][out["artifactSelectors"][0]["producerSubtask"]]
                outputs[(name, key)] = trained_by(inner, items)
            for inner in body["tasks"].values():
                if function(inner) in ("train_teacher_op", "distill_student_op"):
                    plan.trained.update(trained_by(inner, items))
    plan.trained.update(n for names in outputs.values() for n in names)

    def models_into(task: dict) -> set[str]:
        found = set()
        for input_name, source in task["inputs"].get("artifacts", {}).items():
            ref = source.get("taskOutputArtifact")
            names = outputs.get((ref["producerTask"], ref["outputArtifactKey"])) if ref else None
            if names:
                if input_name in ("teacher", "student"):
                    assert names == [input_name], f"{function(task)} gets {names} as its {input_name}"
                found.update(names)
        return found

    (evaluate,) = [t for t in root.values() if function(t) == "evaluate_op"]
    (register,) = [t for t in root.values() if function(t) == "register_op"]
    plan.evaluated, plan.registered = models_into(evaluate), models_into(register)
    return plan


# -------------------------------------------------------------------------------------------- Prefect


def prefect_plan(tmp_path: Path, params, monkeypatch) -> Plan:
    """Run the flow with recording steps: the models each step is handed, in the order the flow calls them."""
    from pipeline.prefect_flow import run_flow

    names: dict[str, str] = {}  # model folder -> row name
    calls: list[tuple[str, set[str]]] = []

    def train_teacher(prepared_dir, out_dir, params, report_dir=None, resume=False):
        names[out_dir] = "teacher"
        calls.append(("train", {"teacher"}))
        return {}

    def distill_student(prepared_dir, teacher_dir, out_dir, params, row="default", report_dir=None, resume=False):
        names[out_dir] = row_name(row)
        calls.append(("train", {row_name(row)}))
        return {}

    def evaluate(prepared_dir, probes_dir, models, out_dir, params, track=True, device=None):
        for name, path in models.items():
            assert names.get(path) == name, f"Prefect evaluates {path} as {name!r}, trained as {names.get(path)!r}"
        calls.append(("evaluate", set(models)))
        return {}

    def register(model_dir, eval_dir, out_dir, params, role="student", row=None, force=False, teacher_dir=None,
                 prepared_dir=None, **kw):
        calls.append(("register", {names[model_dir]} | ({names[teacher_dir]} if teacher_dir else set())))
        return {"name": "recorded", "version": "1"}

    monkeypatch.setattr("components.prepare.prepare", lambda source, out_dir, params, **kw: {})
    monkeypatch.setattr("components.synthesize.synthesize", lambda prepared_dir, out_dir, params, **kw: {})
    monkeypatch.setattr("components.train_teacher.train_teacher", train_teacher)
    monkeypatch.setattr("components.distill_student.distill_student", distill_student)
    monkeypatch.setattr("components.evaluate.evaluate", evaluate)
    monkeypatch.setattr("components.register.register", register)
    run_flow(params, str(tmp_path / "prefect-work"), str(tmp_path / "no-data"))

    steps = [step for step, _ in calls]
    assert steps.index("evaluate") > max(i for i, s in enumerate(steps) if s == "train"), "evaluated before trained"
    plan = Plan()
    for step, models in calls:
        getattr(plan, {"train": "trained", "evaluate": "evaluated", "register": "registered"}[step]).update(models)
    return plan



# --------------------------------------------------------------------------------------------- the test


def test_dvc_kubeflow_and_prefect_train_evaluate_and_register_the_same_models(tmp_path, prefect_home, monkeypatch):
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["ablation_rows"] = ROWS
    params = load_params(REPO / "params.yaml", [f"ablation_rows={ROWS}"])
    plans = {
        "dvc": dvc_plan(tmp_path, doc),
        "kubeflow": kfp_plan(tmp_path, params),
        "prefect": prefect_plan(tmp_path, params, monkeypatch),
    }
    everything = {"teacher", "student", *ROWS}
    for name, plan in plans.items():
        assert plan.trained == everything, f"{name} trains {sorted(plan.trained)}"
        assert plan.evaluated == plan.trained, f"{name} evaluates {sorted(plan.evaluated)} of {sorted(plan.trained)}"
        assert plan.registered == {"student", "teacher"}, f"{name} registers {sorted(plan.registered)}"
    assert plans["dvc"] == plans["kubeflow"] == plans["prefect"]


def test_kubeflow_without_table_rows_evaluates_teacher_and_student(tmp_path):
    """The demo (no rows) compiles without a loop, and still evaluates and registers both models."""
    plan = kfp_plan(tmp_path, load_params(REPO / "params.yaml", ["ablation_rows=[]"]))
    assert plan == Plan({"teacher", "student"}, {"teacher", "student"}, {"student", "teacher"})
