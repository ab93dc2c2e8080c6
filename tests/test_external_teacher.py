"""Any HR face model as the teacher: ONNX (a model crfr exported) and dlib, adopted, checked and distilled from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.distill_student import distill_student
from components.train_teacher import train_teacher
from crfr.config import ExternalTeacherCfg, load_params
from crfr.data.shards import ShardDataset
from crfr.errors import ConfigError, DataError
from crfr.models.embedding import embed_images
from crfr.models.external import ExternalNet, adopt, is_external
from crfr.models.model_file import load_model
from crfr.train.external_teacher import CentreTeacher
from tests.builders import make_prepared


@pytest.fixture(scope="module")
def prepared(lfw_root, tmp_path_factory):
    return make_prepared(lfw_root, tmp_path_factory.mktemp("prepared"), validation_ids=4)


def tiny_params(tmp_path, *extra):
    return load_params("params.yaml", [
        "profile=tiny", f"run_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}", f"storage.cache_dir={tmp_path / 'cache'}",
        "runtime.threads=2", "runtime.holdout_pairs=20", "teacher.batch_size=8", "student.batch_size=8",
        "teacher.max_steps_per_epoch=2", "student.max_steps_per_epoch=2", *extra])


@pytest.fixture(scope="module")
def crfr_onnx(prepared, tmp_path_factory):
    """A teacher crfr trained, exported with ``export_onnx``: (its model dir, the .onnx file)."""
    from crfr.serve.embedder import FaceEmbedder
    from crfr.serve.onnx_export import export_onnx

    tmp = tmp_path_factory.mktemp("onnx-teacher")
    train_teacher(str(prepared), str(tmp / "teacher"), tiny_params(tmp))
    export_onnx(FaceEmbedder.from_dir(tmp / "teacher"), tmp / "teacher.onnx", exporter="torchscript")
    return tmp / "teacher", tmp / "teacher.onnx"


def test_an_onnx_teacher_embeds_as_the_model_it_was_exported_from(crfr_onnx, prepared, tmp_path):
    model_dir, onnx_file = crfr_onnx
    info = adopt("onnx", str(onnx_file), ExternalTeacherCfg(), tmp_path / "adopted")
    assert is_external(tmp_path / "adopted") and info["embedding_size"] == 32 and len(info["sha256"]) == 64
    external, meta = load_model(tmp_path / "adopted")
    torch_net, _ = load_model(model_dir)
    faces = np.stack([ShardDataset(prepared / "train")[i][0] for i in range(6)])
    a = embed_images(external, faces, batch_size=4, device="cpu", progress=False)
    b = embed_images(torch_net, faces, batch_size=4, device="cpu", progress=False)
    assert float((a * b).sum(1).min()) > 0.9999  # the same embeddings, through onnxruntime
    assert meta["backbone"] == "external-onnx" and meta["meta"]["sha256"] == info["sha256"]


def test_a_file_that_is_not_a_face_model_is_refused_with_its_name(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(DataError, match=r"notes.onnx: not a loadable ONNX model"):
        adopt("onnx", str(text), ExternalTeacherCfg(), tmp_path / "a")
    classifier = tmp_path / "classifier.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 112 * 112, 2)).eval(),
                      (torch.zeros(1, 3, 112, 112),), str(classifier), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    with pytest.raises(DataError, match=r"classifier.onnx: not a face embedding model: its output for 2 faces "
                                         r"has shape \[2, 2\]"):
        adopt("onnx", str(classifier), ExternalTeacherCfg(), tmp_path / "b")
    vector = tmp_path / "vector.onnx"
    torch.onnx.export(torch.nn.Linear(10, 64).eval(), (torch.zeros(1, 10),), str(vector), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    with pytest.raises(DataError, match=r"vector.onnx: not a face embedding model: it should take one image batch"):
        adopt("onnx", str(vector), ExternalTeacherCfg(), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing published for a refused file
    with pytest.raises(ConfigError, match="source: onnx needs teacher.onnx"):
        load_params("params.yaml", ["teacher.source=onnx"])


class _Faces(list):
    num_classes = 2


def test_class_centre_logits_are_s_cos_and_the_embeddings_are_cached(tmp_path):
    rng = np.random.default_rng(0)
    faces = _Faces([(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), i % 2) for i in range(6)])
    calls = []

    def run(pixels):  # a fixed linear "face model" on 0-255 pixels
        calls.append(len(pixels))
        return pixels.reshape(len(pixels), -1)[:, :20] / 255.0

    net = ExternalNet(run, 8, {"sha256": "x" * 64, "source": "onnx"})
    teacher = CentreTeacher(net, faces, scale=16.0, cache_dir=tmp_path)
    assert sum(calls) == 12  # every face and its mirror, once
    expected = torch.nn.functional.normalize(net(torch.from_numpy(np.stack([faces[0][0]])).permute(0, 3, 1, 2)
                                                 .float().div(127.5).sub(1.0)), dim=1) @ teacher.centres.T * 16.0
    got = teacher.logits(teacher.embeddings_of(torch.from_numpy(np.stack([faces[0][0]]))))
    assert torch.allclose(got, expected, atol=1e-5) and sum(calls) == 13  # the check above ran the net
    mirrored = torch.from_numpy(np.ascontiguousarray(faces[1][0][:, ::-1])[None])
    teacher.embeddings_of(mirrored)
    assert sum(calls) == 13  # a mirrored training face is found in the cache
    unseen = torch.from_numpy(rng.integers(0, 255, (1, 8, 8, 3), dtype=np.uint8))
    teacher.embeddings_of(unseen)
    assert sum(calls) == 14  # an augmented face is embedded on the spot
    again = CentreTeacher(net, faces, scale=16.0, cache_dir=tmp_path)
    assert sum(calls) == 14 and torch.equal(again.centres, teacher.centres)  # the cache, not the model
    assert len(list((tmp_path / "teacher-embeddings").glob("*.npz"))) == 1  # one file per model
    # A superset of the faces embeds only its new faces (and their mirrors); a subset embeds none.
    more = _Faces(faces + [(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), i % 2) for i in range(2)])
    grown = CentreTeacher(net, more, scale=16.0, cache_dir=tmp_path)
    assert sum(calls) == 18 and torch.equal(grown.embeddings[:6], teacher.embeddings[:6])
    CentreTeacher(net, _Faces(more[4:]), scale=16.0, cache_dir=tmp_path)
    assert sum(calls) == 18
    other = ExternalNet(run, 8, {"sha256": "y" * 64, "source": "onnx"})
    CentreTeacher(other, faces, scale=16.0, cache_dir=tmp_path)
    assert sum(calls) == 30  # another model's cache is its own


def test_unlabelled_faces_join_no_centre_and_are_embedded_for_the_matching_term():
    from crfr.data.shards import UNLABELLED

    rng = np.random.default_rng(1)
    labelled = [(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), i % 2) for i in range(4)]
    extra = [(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), UNLABELLED) for _ in range(2)]
    net = ExternalNet(lambda x: x.reshape(len(x), -1)[:, :20] / 255.0, 8, {"sha256": "z" * 64, "source": "onnx"})
    both = CentreTeacher(net, _Faces(labelled + extra), scale=16.0, cache_dir=None)
    only = CentreTeacher(net, _Faces(labelled), scale=16.0, cache_dir=None)
    assert torch.allclose(both.centres, only.centres) and len(both.lookup) == 12


def test_a_student_distils_from_unlabelled_faces_too(crfr_onnx, lfw_root, tmp_path):
    _, onnx_file = crfr_onnx
    prepared = make_prepared(lfw_root, tmp_path / "prepared", validation_ids=4, unlabelled=12)
    assert (ShardDataset(prepared / "train").labels == -1).sum() == 12
    params = tiny_params(tmp_path, "teacher.source=onnx", f"teacher.onnx={onnx_file}", "data.unlabelled=true",
                         "loss.lambda_match=1.0")
    train_teacher(str(prepared), str(tmp_path / "teacher"), params)
    student = distill_student(str(prepared), str(tmp_path / "teacher"), str(tmp_path / "student"), params)
    final = student["final"]
    assert all(np.isfinite(v) for v in final.values() if isinstance(v, float)) and final["loss_match"] > 0


def test_the_pipeline_adopts_an_onnx_teacher_and_distils_from_it(crfr_onnx, prepared, tmp_path, caplog):
    _, onnx_file = crfr_onnx
    params = tiny_params(tmp_path, "teacher.source=onnx", f"teacher.onnx={onnx_file}")
    summary = train_teacher(str(prepared), str(tmp_path / "teacher"), params, str(tmp_path / "reports"))
    assert summary["source"] == "onnx" and summary["embedding_size"] == 32
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert {"val_acc_14", "val_acc_112", "sha256"} <= set(metrics)
    record = json.loads((tmp_path / "teacher" / "external.json").read_text())
    assert record["mlflow_run_id"] == summary["mlflow_run_id"]
    with caplog.at_level("WARNING"):
        student = distill_student(str(prepared), str(tmp_path / "teacher"), str(tmp_path / "student"), params)
    assert "wavelet similarity (Eq. 3) off" in caplog.text and "starts from scratch" in caplog.text
    assert student["final"]["loss_distill"] > 0 and "loss_wavesim" not in student["final"]
    assert "loss_match" not in student["final"]  # loss.lambda_match is 0 by default
    # The embedding-matching term: the teacher's 32-d embeddings against the student's, only where both agree.
    matched = distill_student(str(prepared), str(tmp_path / "teacher"), str(tmp_path / "student-match"),
                              tiny_params(tmp_path, "teacher.source=onnx", f"teacher.onnx={onnx_file}",
                                          "loss.lambda_match=1.0"))
    assert 0 < matched["final"]["loss_match"] <= 2
    # Without identity labels: ArcFace and KD weighed 0, the teacher's embeddings are the whole loss.
    unlabelled = distill_student(str(prepared), str(tmp_path / "teacher"), str(tmp_path / "student-nolabel"),
                                 tiny_params(tmp_path, "teacher.source=onnx", f"teacher.onnx={onnx_file}",
                                             "loss.lambda_match=1.0", "loss.lambda_arcface=0", "loss.lambda1=0"))
    final = unlabelled["final"]
    assert final["loss_arcface"] > 0 and final["loss_total"] == pytest.approx(final["loss_match"], rel=1e-4)
    with pytest.raises(ConfigError, match="loss.lambda_match: the teacher .onnx. gives 32-d embeddings"):
        distill_student(str(prepared), str(tmp_path / "teacher"), str(tmp_path / "student-16"),
                        tiny_params(tmp_path, "teacher.source=onnx", f"teacher.onnx={onnx_file}",
                                    "loss.lambda_match=1.0", "model.embedding_size=16"))
    # Evaluation scores the adopted teacher beside the student, at every resolution.
    from components.evaluate import discover_models, evaluate

    models = discover_models(str(tmp_path), params)
    result = evaluate(str(prepared), None, models, str(tmp_path / "evaluate"), params, track=False)
    assert {"teacher", "student"} <= set(result["metrics"])
    assert set(result["metrics"]["teacher"]["lfw"]["linear"]) >= {"14", "112"}
    from crfr.registry.lineage import external_model, training_run_id

    assert training_run_id(tmp_path / "teacher") == summary["mlflow_run_id"]
    assert external_model(tmp_path / "teacher")["sha256"] == record["sha256"]
    # Registered like a trained teacher: a crfr-teacher version that names its source and still embeds.
    import mlflow

    from components.register import register

    result = register(str(tmp_path / "student"), str(tmp_path / "evaluate"), str(tmp_path / "registration"),
                      params, teacher_dir=str(tmp_path / "teacher"), prepared_dir=str(prepared))
    client = mlflow.MlflowClient()
    version = client.get_model_version(params.registry.teacher_name, result["teacher"]["version"])
    assert json.loads(version.tags["lineage.external_model"])["sha256"] == record["sha256"]
    served = mlflow.pyfunc.load_model(f"models:/{params.registry.teacher_name}/{version.version}")
    from crfr.serve.pyfunc import input_example

    assert served.predict(input_example()).shape == (1, 32)
    from crfr.serve.embedder import FaceEmbedder
    from crfr.serve.onnx_export import ExportError, export_onnx

    with pytest.raises(ExportError, match="is an adopted external teacher"):
        export_onnx(FaceEmbedder.from_dir(tmp_path / "teacher"), tmp_path / "again.onnx")


def test_dlib_teacher_tells_people_apart_on_lfw_faces(prepared, tmp_path):
    pytest.importorskip("dlib", reason="dlib is the optional extra crfr[dlib] (dlib-bin, face-recognition-models)")
    pytest.importorskip("face_recognition_models", reason="the weights come with face-recognition-models")
    adopt("dlib", None, ExternalTeacherCfg(), tmp_path / "dlib")
    net, meta = load_model(tmp_path / "dlib")
    assert meta["meta"]["embedding_size"] == 128 and meta["meta"]["input_size"] == 150
    faces = ShardDataset(prepared / "train")
    by_label: dict[int, list[np.ndarray]] = {}
    for i in range(len(faces)):
        img, label = faces[i]
        by_label.setdefault(int(label), []).append(np.asarray(img))
    a, b = [imgs[:2] for imgs in list(by_label.values())[:2]]
    emb = embed_images(net, np.stack(a + b), batch_size=4, device="cpu", progress=False)
    same = [float(emb[0] @ emb[1]), float(emb[2] @ emb[3])]
    different = [float(emb[0] @ emb[2]), float(emb[1] @ emb[3])]
    assert min(same) > max(different)
    # dlib's worker processes give the embeddings one process gives
    from crfr.models.external import _dlib_runner

    pixels = np.random.default_rng(0).uniform(0, 255, (20, 3, 150, 150)).astype(np.float32)
    one, _ = _dlib_runner(workers=1)
    two, _ = _dlib_runner(workers=2)
    assert np.array_equal(one(pixels), two(pixels))
