"""``crfr export onnx``: the exported graph, run by onnxruntime on real LFW faces, embeds as torch does."""

from __future__ import annotations

import os
import uuid

import numpy as np
import onnxruntime as ort
import pytest

from crfr.cli import main
from crfr.config import ModelCfg
from crfr.errors import DataError
from crfr.faces.images import read_image
from crfr.registry.resolve import resolve_model
from crfr.serve.embedder import FaceEmbedder
from crfr.serve.onnx_embedder import OnnxFaceEmbedder
from crfr.serve.onnx_export import ExportError, check_agreement, export_onnx, max_cosine_deviation
from tests.facedata import image_path, load_face, make_params, require_lfw, save_random_model

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
PEOPLE = ["Abel_Pacheco", "Akhmed_Zakayev", "Colin_Powell", "Serena_Williams", "Tony_Blair", "Hugo_Chavez",
          "George_W_Bush"]


def real_faces() -> list[np.ndarray]:
    """Seven people's first image: the raw 250x250 files (centre-cropped by the embedder) and one LR face."""
    require_lfw()
    faces = [read_image(image_path(p, 1)) for p in PEOPLE]
    return faces + [load_face("Colin_Powell", 2)[::4, ::4].copy()]  # a 28 px probe, brought up to 112


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite registry holding a WaveResNet student with the champion alias, and params pointing at it."""
    from crfr.registry.promote import promote
    from crfr.registry.register import register_model

    tmp = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        name = f"crfr-student-{uuid.uuid4().hex[:8]}"
        overrides = [f"tracking.artifact_location={tmp}/mlartifacts", f"registry.student_name={name}"]
        params = make_params(tmp, overrides)
        model = save_random_model(tmp / "student", seed=5, backbone="waveresnet")
        version = register_model(model, {"14": 70.0, "112": 80.0}, {"14": 1.3, "112": 1.1}, params)
        promote(name, version.version, params)
        (tmp / "params.yaml").write_text("profile: demo\ntracking: {artifact_location: %s/mlartifacts}\n"
                                         "registry: {student_name: %s}\n" % (tmp, name))
        yield params, tmp, name, model


def test_champion_exports_and_agrees_with_torch_on_real_faces(registry, tmp_path, capsys):
    from mlflow import MlflowClient

    from crfr.registry.resolve import load_embedder

    params, tmp, name, _ = registry
    out = tmp_path / "student.onnx"
    assert main(["export", "onnx", f"models:/{name}@champion", "--out", str(out),
                 "--params", str(tmp / "params.yaml")]) == 0
    printed = capsys.readouterr().out
    assert f"{name} version 1" in printed and "largest cosine deviation" in printed

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 112, 112]

    torch_embedder = load_embedder(f"models:/{name}@champion", params)
    faces = real_faces()
    reference = torch_embedder.embed(faces)
    onnx_embedder = OnnxFaceEmbedder(out)
    assert onnx_embedder.fingerprint == torch_embedder.fingerprint
    assert onnx_embedder.thresholds == {"14": 1.3, "112": 1.1}
    deviation = max_cosine_deviation(reference, onnx_embedder.embed(faces))
    print(f"largest cosine deviation onnxruntime vs torch on {len(faces)} real faces: {deviation:.3e}")
    assert deviation < 1e-5

    # The batch is dynamic: batches of 1, 3 and 8 give the same rows.
    from crfr.models.embedding import to_tensor

    x = to_tensor(torch_embedder.prepare(faces)).numpy()
    rows = np.concatenate([session.run(None, {"input": x[i:j]})[0] for i, j in ((0, 1), (1, 4), (4, 8))])
    np.testing.assert_allclose(rows, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)

    # Logged beside the registered version: an artifact of its run, and a tag on the version.
    client = MlflowClient()
    version = client.get_model_version(name, "1")
    assert [a.path for a in client.list_artifacts(version.run_id, "onnx")] == ["onnx/student.onnx"]
    assert version.tags["onnx"] == f"runs:/{version.run_id}/onnx/student.onnx"
    assert resolve_model(f"models:/{name}@champion", params).load_uri == f"models:/{name}/1"


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_agree_for_teacher_and_student(tmp_path, exporter):
    faces = real_faces()
    for backbone in ("iresnet", "waveresnet"):
        embedder = FaceEmbedder.from_dir(save_random_model(tmp_path / backbone, seed=3, backbone=backbone))
        summary = export_onnx(embedder, tmp_path / f"{backbone}.onnx", exporter=exporter)
        assert summary["exporter"] == exporter and summary["max_cosine_deviation"] < 1e-5
        assert max_cosine_deviation(embedder.embed(faces), OnnxFaceEmbedder(tmp_path / f"{backbone}.onnx")
                                    .embed(faces)) < 1e-5


def test_reference_ll_filter_is_exported_as_the_fast_one(tmp_path):
    """pytorch_wavelets' DWTForward cannot be exported; the fast filter computes the same LL band."""
    from crfr.models import build_backbone
    from crfr.models.model_file import save_model

    cfg = ModelCfg(depth=18, width=0.125, embedding_size=32, ll_impl="reference")
    import torch

    torch.manual_seed(0)
    save_model(tmp_path / "ref", build_backbone("waveresnet", cfg).eval(), "waveresnet", cfg)
    embedder = FaceEmbedder.from_dir(tmp_path / "ref")
    summary = export_onnx(embedder, tmp_path / "ref.onnx")
    assert summary["reference_filters_swapped"] >= 1  # the blocks share one WaveDown
    assert max_cosine_deviation(embedder.embed(real_faces()),
                                OnnxFaceEmbedder(tmp_path / "ref.onnx").embed(real_faces())) < 1e-5


def test_agreement_check_catches_an_export_of_another_model(tmp_path):
    one = FaceEmbedder.from_dir(save_random_model(tmp_path / "a", seed=1, backbone="waveresnet"))
    other = FaceEmbedder.from_dir(save_random_model(tmp_path / "b", seed=2, backbone="waveresnet"))
    export_onnx(one, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="differ from torch's"):
        check_agreement(other, tmp_path / "a.onnx", np.stack(real_faces()[:4]))


def test_foreign_or_broken_onnx_files_are_refused(tmp_path):
    import torch

    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(plain), dynamo=False)
    with pytest.raises(DataError, match="not a crfr ONNX export"):
        OnnxFaceEmbedder(plain)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(DataError, match="not a loadable ONNX model"):
        OnnxFaceEmbedder(text)


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["export", "onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx"), "--no-log"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("crfr: error:") and "missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
